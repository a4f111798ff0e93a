//! The library's error type.

/// Everything that can stop the daemon from starting or a client from working.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A component spec cannot be run; `at` says which component.
    #[error("{at}: {source}")]
    Spec {
        /// Which component (`components[2]`).
        at: String,
        /// The key and what is wrong.
        source: crate::config::SpecError,
    },
    /// The embedded store failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The broker link failed.
    #[error(transparent)]
    Link(#[from] crate::amqp::LinkError),
    /// A socket or file failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A listener cannot be bound (the message names the address).
    #[error(transparent)]
    Bind(#[from] crate::serve::BindError),
    /// A client was given something it cannot use (a malformed uuid).
    #[error("{0}")]
    Usage(String),
    /// A client operation timed out while the target was there (it
    /// answered, but did not get where it was asked to in time).
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// Nothing answered for the target: no reply, no status, not even to a
    /// ping (a wrong uuid, or its daemon is down).
    #[error("no component answered for uuid {0}")]
    NoAnswer(uuid::Uuid),
    /// A bug or impossible state, with context.
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// A short label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::Spec { .. } => "spec",
            Error::Usage(_) => "usage",
            Error::Store(_) => "store",
            Error::Link(_) => "amqp",
            Error::Io(_) => "io",
            Error::Bind(_) => "bind",
            Error::Timeout(_) => "timeout",
            Error::NoAnswer(_) => "no_answer",
            Error::Internal(_) => "internal",
        }
    }
}

impl Error {
    /// A spec error of the component `at`.
    pub fn spec(at: impl Into<String>, source: crate::config::SpecError) -> Self {
        Error::Spec { at: at.into(), source }
    }
}

impl From<lapin::Error> for Error {
    fn from(e: lapin::Error) -> Self {
        Error::Link(e.into())
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

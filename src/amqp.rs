//! The crate's AMQP toolbox, a leaf: parse a broker URL with busbar's
//! defaults, connect (named, so the broker's management UI says who is
//! who), back off between attempts, declare exchanges and queues, consume,
//! publish in batches. Every AMQP user goes through it: the bus
//! supervisor, the CLI client, the federation publisher and the AMQP
//! southbound of IoT gateways. It knows nothing of components or the
//! daemon.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A broker link failed: the URL, the connection or the channel.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The broker or the connection failed.
    #[error("amqp: {0}")]
    Amqp(#[from] lapin::Error),
    /// The connection reported an error and is gone.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The broker URL does not parse.
    #[error("invalid broker URL: {0}")]
    Url(String),
    /// A handler panicked; the link is dropped and made again.
    #[error("panicked: {0}")]
    Panicked(String),
}

/// Parse an AMQP URL, filling in busbar's defaults where the URL sets none:
/// 16 KiB frames (lapin keeps 32 frames of buffer in each direction, so the
/// broker's default 128 KiB frames would cost 8 MiB of resident memory), a
/// 30 s heartbeat so a silently dead broker is noticed, and a 5 s connect
/// timeout.
pub fn amqp_uri(url: &str) -> Result<lapin::uri::AMQPUri, LinkError> {
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(|e: String| LinkError::Url(e))?;
    let q = &mut uri.query;
    q.frame_max.get_or_insert(16 * 1024);
    q.heartbeat.get_or_insert(30);
    q.connection_timeout.get_or_insert(5_000);
    Ok(uri)
}

/// Connect to `url` (see [`amqp_uri`]) as `name`, the connection name
/// the broker shows (`busbar daemon exchange=villas`).
pub async fn connect(url: &str, name: &str) -> Result<Connection, LinkError> {
    let uri = amqp_uri(url)?;
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect_uri(uri, props).await?)
}

/// Waits between reconnection attempts: 100 ms, doubling up to 2 s, back to
/// 100 ms once a connection worked ([`Backoff::reset`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_millis(100);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(2);

    /// A backoff at its first wait.
    pub fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    /// A connection worked: the next failure waits [`Backoff::FIRST`] again.
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The wait to take now; the one after is twice as long, at most
    /// [`Backoff::MAX`].
    pub fn next_delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        now
    }

    /// Sleep for [`Backoff::next_delay`]; `false` if `token` was cancelled
    /// first (the caller stops).
    pub async fn wait(&mut self, token: &CancellationToken) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.next_delay()) => true,
            _ = token.cancelled() => false,
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

/// Declare the durable headers exchange, as VILLAScontroller and VILLASweb do.
pub async fn declare_exchange(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Headers,
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
}

/// Declare a durable topic exchange (federation and device data).
pub async fn declare_topic_exchange(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
}

/// Declare a server-named, exclusive, auto-delete queue: it goes with the
/// connection, so nothing is left behind on the broker.
pub async fn declare_private_queue(ch: &Channel, args: FieldTable) -> Result<ShortString, lapin::Error> {
    let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    Ok(ch.queue_declare("".into(), opts, args).await?.name().clone())
}

/// Declare a private queue (see [`declare_private_queue`]) and bind it to
/// the headers exchange `exchange` with `binding`.
pub async fn declare_bound_queue(
    ch: &Channel,
    exchange: &str,
    binding: FieldTable,
) -> Result<ShortString, lapin::Error> {
    let name = declare_private_queue(ch, FieldTable::default()).await?;
    ch.queue_bind(name.clone(), exchange.into(), "".into(), QueueBindOptions::default(), binding).await?;
    Ok(name)
}

/// Start consuming `queue` without acks (as the anchor does).
pub async fn consume(ch: &Channel, queue: ShortString) -> Result<lapin::Consumer, lapin::Error> {
    ch.basic_consume(
        queue,
        "".into(),
        BasicConsumeOptions { no_ack: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
}

/// The next delivery of an optional consumer; pending forever without one.
/// When the consumer ends (queue deleted, connection lost) it is dropped,
/// and the owner waits for a new one.
pub async fn next_delivery(consumer: &mut Option<Box<lapin::Consumer>>) -> Option<lapin::message::Delivery> {
    match consumer {
        Some(c) => match c.next().await {
            Some(Ok(d)) => Some(d),
            _ => {
                *consumer = None;
                None
            }
        },
        None => std::future::pending().await,
    }
}

/// Publish a batch on `ch`, in order, with one hand-off to lapin's I/O
/// thread for the whole batch.
///
/// `Channel::basic_publish` resolves only once lapin's I/O thread has taken
/// the frames, so publishing one message at a time is a round trip between
/// two threads per message. Here every publish is started before any is
/// awaited: the first polls run in the batch's order (which fixes the
/// order on the wire and of the confirms' delivery tags), then all are
/// awaited together. The results are in the batch's order.
pub async fn publish_batch<'a>(
    ch: &Channel,
    exchange: &ShortString,
    props: &BasicProperties,
    messages: impl IntoIterator<Item = (&'a ShortString, &'a [u8])>,
) -> Vec<lapin::Result<lapin::PublisherConfirm>> {
    let mut publishes: Vec<_> = messages
        .into_iter()
        .map(|(key, body)| {
            Box::pin(ch.basic_publish(
                exchange.clone(),
                key.clone(),
                BasicPublishOptions::default(),
                body,
                props.clone(),
            ))
        })
        .collect();
    let mut results: Vec<Option<lapin::Result<lapin::PublisherConfirm>>> = publishes.iter().map(|_| None).collect();
    // Publishes complete in order; everything before `done` has.
    let mut done = 0;
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, (publish, result)) in publishes.iter_mut().zip(results.iter_mut()).enumerate().skip(done) {
            if result.is_none() {
                match publish.as_mut().poll(cx) {
                    std::task::Poll::Ready(r) => *result = Some(r),
                    std::task::Poll::Pending => all = false,
                }
            }
            if all {
                done = i + 1;
            }
        }
        if all { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling_and_resets() {
        let mut b = Backoff::new();
        let waits: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_delay(), Backoff::FIRST);
    }

    #[test]
    fn broker_urls_get_busbars_defaults_unless_they_set_their_own() {
        let uri = amqp_uri("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(
            (uri.query.frame_max, uri.query.heartbeat, uri.query.connection_timeout),
            (Some(16384), Some(30), Some(5000))
        );
        let own = amqp_uri("amqp://h/%2f?heartbeat=5&frame_max=131072").unwrap();
        assert_eq!((own.query.frame_max, own.query.heartbeat), (Some(131072), Some(5)));
        assert!(matches!(amqp_uri("http://nope"), Err(LinkError::Url(_))));
    }
}

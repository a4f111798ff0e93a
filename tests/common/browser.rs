//! Headless Chromium driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`, installed by `scripts/chromium`) with fantoccini.

use fantoccini::{Client, ClientBuilder};
use serde_json::json;
use std::time::{Duration, Instant};

/// A ChromeDriver process and one browser session.
pub struct Browser {
    driver: tokio::process::Child,
    /// The WebDriver session.
    pub client: Client,
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

impl Browser {
    /// Start ChromeDriver and a headless Chromium, or `None` (with the
    /// reason on stderr) when they are not installed.
    pub async fn start() -> Option<Browser> {
        let (chromium, driver) = ("/usr/bin/chromium", "/usr/bin/chromedriver");
        if !std::path::Path::new(chromium).exists() || !std::path::Path::new(driver).exists() {
            eprintln!("skipped: {chromium} or {driver} is missing (scripts/chromium installs them)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver runs");
        let end = Instant::now() + Duration::from_secs(20);
        while !port_open(port) {
            assert!(Instant::now() < end, "chromedriver did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"binary": chromium, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1400,1000"]}),
        );
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a browser session");
        Some(Browser { driver: child, client })
    }

    /// Wait until `js` (the body of a function returning a value) returns
    /// something truthy, polling the page; panic with `what` after `within`.
    pub async fn until(&self, what: &str, within: Duration, js: &str) -> serde_json::Value {
        let end = Instant::now() + within;
        loop {
            let v = self.client.execute(js, vec![]).await.unwrap_or(serde_json::Value::Null);
            if !(v.is_null() || v == false || v == "" || v == 0) {
                return v;
            }
            assert!(Instant::now() < end, "the page did not show {what} within {within:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Click the element `css`, in the page in one step: the page
    /// re-renders its rows on every event, so an element found by WebDriver
    /// may be replaced before a WebDriver click reaches it (stale).
    pub async fn click(&self, css: &str) {
        let js = format!(
            "const e = document.querySelector({}); if (!e) return false; e.click(); return true;",
            serde_json::to_string(css).unwrap()
        );
        self.until(&format!("{css} to click"), Duration::from_secs(10), &js).await;
    }

    /// Save a screenshot as `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        let png = self.client.screenshot().await.expect("a screenshot");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, png).unwrap();
    }

    /// End the session and ChromeDriver.
    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill().await;
    }
}

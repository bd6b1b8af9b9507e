//! The exchange log: one JSON line per exchange a capture source produced, before sampling.
//!
//! It shows an operator (and the capture tests) exactly what Specter rebuilt: method, target,
//! headers, body sizes and hashes, quality. Writing happens on its own thread behind a bounded
//! queue, so a slow disk never holds up the pipeline; lines that do not fit are counted.

use std::{
    io::{BufWriter, Write as _},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use serde::Serialize;
use tracing::warn;

use crate::exchange::{Exchange, Headers, Quality, Source};

/// Lines waiting to be written; beyond this they are dropped and counted.
const QUEUE: usize = 65536;

#[derive(Serialize)]
struct Line {
    source: Source,
    quality: Quality,
    client: Option<String>,
    routing_key: Option<String>,
    method: String,
    target: String,
    request_headers: Vec<(String, String)>,
    request_body_len: usize,
    request_body_xxh3: String,
    status: u16,
    response_headers: Vec<(String, String)>,
    response_body_len: usize,
    response_body_xxh3: String,
    live_latency_us: u128,
}

/// The writer's queue. Dropping it lets the writer finish and close the file.
pub struct ExchangeLog {
    /// Exchanges are cheap to clone (bodies are shared); hashing and encoding happen on the
    /// writer thread, off the capture path.
    queue: mpsc::SyncSender<Exchange>,
    writer: Option<thread::JoinHandle<()>>,
}

impl ExchangeLog {
    /// Creates (truncates) the file and starts the writer thread.
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::File::create(path)?;
        let (queue, lines) = mpsc::sync_channel::<Exchange>(QUEUE);
        let path = path.to_owned();
        let writer = thread::Builder::new()
            .name("specter-exchange-log".into())
            .spawn(move || write_lines(path, BufWriter::new(file), lines))?;
        Ok(Self {
            queue,
            writer: Some(writer),
        })
    }

    /// Queues one exchange; false when the queue was full and the line was dropped.
    pub fn record(&self, exchange: &Exchange) -> bool {
        self.queue.try_send(exchange.clone()).is_ok()
    }
}

impl Line {
    fn of(exchange: &Exchange) -> Self {
        Line {
            source: exchange.source,
            quality: exchange.quality,
            client: exchange.client.map(|c| c.to_string()),
            routing_key: exchange.routing_key.clone(),
            method: exchange.request.method.clone(),
            target: exchange.request.target.clone(),
            request_headers: text_headers(&exchange.request.headers),
            request_body_len: exchange.request.body.len(),
            request_body_xxh3: hash(&exchange.request.body),
            status: exchange.response.status,
            response_headers: text_headers(&exchange.response.headers),
            response_body_len: exchange.response.body.len(),
            response_body_xxh3: hash(&exchange.response.body),
            live_latency_us: exchange.timing.live_latency.as_micros(),
        }
    }
}

impl Drop for ExchangeLog {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what is queued.
        let (closed, _) = mpsc::sync_channel(0);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_lines(path: PathBuf, mut out: BufWriter<std::fs::File>, lines: mpsc::Receiver<Exchange>) {
    let mut failed = false;
    // Write what is queued, then flush, so readers see every line soon after it happened.
    while let Ok(first) = lines.recv() {
        for exchange in std::iter::once(first).chain(lines.try_iter()) {
            let written = serde_json::to_writer(&mut out, &Line::of(&exchange))
                .map_err(std::io::Error::from)
                .and_then(|()| out.write_all(b"\n"));
            if let Err(error) = written
                && !failed
            {
                warn!(path = %path.display(), %error, "Cannot write the exchange log");
                failed = true;
            }
        }
        let _ = out.flush();
    }
}

fn text_headers(headers: &Headers) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
        .collect()
}

fn hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

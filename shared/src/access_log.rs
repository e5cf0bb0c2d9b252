//! The access log: one line per request and per TCP connection, written when it completes, as
//! JSON or as `key=value` text, to stdout or a file. Lines go through a bounded queue to a
//! writer thread, so a slow disk never stalls the data plane; when the queue is full, lines are
//! dropped and counted (`quicmesh_access_log_dropped_total`).

use std::borrow::Cow;
use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};

use serde::{Deserialize, Serialize};

use crate::metrics as m;

/// `[access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLogConfig {
    pub output: Output,
    /// The file for `output = "file"` (appended to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    pub format: Format,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    #[default]
    Off,
    Stdout,
    File,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Text,
}

impl AccessLogConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.output == Output::File && self.path.is_none() {
            return Err("output = \"file\" needs a path".into());
        }
        Ok(())
    }
}

/// One completed request or TCP connection. Field names are the log's keys.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Entry {
    /// Start, RFC 3339 with milliseconds.
    pub time: String,
    /// `outbound`, `inbound` or `ingress` (requests); `tcp-outbound`, `tcp-inbound` (tunnels).
    pub direction: &'static str,
    pub request_id: String,
    pub trace_id: String,
    /// Service and route names (`src_service`, `dst_service`, `route`): borrowed when they
    /// are the fixed `unknown` or `none`, which most requests carry (no allocation on every
    /// request's path).
    #[serde(rename = "src.service")]
    pub src_service: Cow<'static, str>,
    #[serde(rename = "src.node")]
    pub src_node: String,
    #[serde(rename = "dst.service")]
    pub dst_service: Cow<'static, str>,
    #[serde(rename = "dst.node")]
    pub dst_node: String,
    pub route: Cow<'static, str>,
    /// The instance address the request went to.
    pub endpoint: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    /// The `quicmesh-error` reason when the proxy answered itself.
    pub error: String,
    pub retries: u32,
    pub duration_ms: f64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Entry {
    fn render(&self, format: Format) -> String {
        match format {
            Format::Json => serde_json::to_string(self).unwrap_or_default(),
            Format::Text => {
                let v = serde_json::to_value(self).unwrap_or_default();
                let Some(map) = v.as_object() else { return String::new() };
                let fields: Vec<String> = map
                    .iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) if s.is_empty() => format!("{k}=-"),
                        serde_json::Value::String(s) if s.contains([' ', '"', '=']) => format!("{k}={s:?}"),
                        serde_json::Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect();
                fields.join(" ")
            }
        }
    }
}

/// Now, RFC 3339 with milliseconds (the `time` field).
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Lines waiting for the writer thread; past this, new lines are dropped.
const QUEUE: usize = 8192;

/// A running access log.
pub struct AccessLog {
    tx: SyncSender<String>,
    format: Format,
}

impl AccessLog {
    /// Starts the writer; `None` when the log is off. A file that cannot be opened is an error.
    pub fn start(config: &AccessLogConfig) -> std::io::Result<Option<AccessLog>> {
        let mut out: Box<dyn Write + Send> = match config.output {
            Output::Off => return Ok(None),
            Output::Stdout => Box::new(std::io::stdout()),
            Output::File => {
                let path = config.path.clone().unwrap_or_default();
                Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
            }
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            while let Ok(line) = rx.recv() {
                let _ = writeln!(out, "{line}");
                // Write out what is queued, then flush once for the batch.
                while let Ok(more) = rx.try_recv() {
                    let _ = writeln!(out, "{more}");
                }
                let _ = out.flush();
            }
        })?;
        Ok(Some(AccessLog { tx, format: config.format }))
    }

    pub fn log(&self, entry: &Entry) {
        match self.tx.try_send(entry.render(self.format)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                metrics::counter!(m::ACCESS_LOG_DROPPED).increment(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_quote_what_needs_it() {
        let e = Entry { direction: "outbound", path: "/a b".into(), status: 200, ..Default::default() };
        let line = e.render(Format::Text);
        assert!(line.contains("direction=outbound"), "{line}");
        assert!(line.contains("path=\"/a b\""), "{line}");
        assert!(line.contains("status=200") && line.contains("request_id=-"), "{line}");
        let json: serde_json::Value = serde_json::from_str(&e.render(Format::Json)).unwrap();
        assert_eq!(json["src.service"], "");
        assert_eq!(json["status"], 200);
    }
}

//! Reading Prometheus text from the components' `/metrics`: the change between two samples as
//! rows per caller and service (request rate, success rate, latency percentiles), as `quicmesh
//! top` and the dashboard show them.
//!
//! Each request is counted once, where it entered the mesh: at the calling node's outbound side
//! or at the gateway's ingress.

use std::collections::{BTreeMap, HashMap};

/// A row's key: (source service, service), (service, route) or (node, service), per [`By`].
pub type Pair = (String, String);

/// What a row of `top` stands for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// Caller and service (as `linkerd viz stat`).
    #[default]
    Service,
    /// Service and route.
    Route,
    /// The node (or gateway) where requests entered the mesh, and service.
    Node,
}

impl By {
    pub fn columns(self) -> (&'static str, &'static str) {
        match self {
            By::Service => ("SOURCE", "SERVICE"),
            By::Route => ("SERVICE", "ROUTE"),
            By::Node => ("NODE", "SERVICE"),
        }
    }
}

/// Counters summed over every scraped component.
#[derive(Debug, Default, Clone)]
pub struct Sample {
    by: By,
    /// Requests and those answered 5xx.
    requests: HashMap<Pair, (f64, f64)>,
    /// Cumulative latency bucket counts by upper bound.
    buckets: HashMap<Pair, BTreeMap<Bound, f64>>,
    /// Failed requests by service and reason (the proxy's error label, else `status NNN`).
    errors: HashMap<Pair, f64>,
}

/// A bucket bound that sorts (`+Inf` last).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bound(f64);
impl Eq for Bound {}
impl PartialOrd for Bound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

pub type Labels = Vec<(String, String)>;

/// One line of the Prometheus text format: name, labels, value.
pub fn parse_line(line: &str) -> Option<(&str, Labels, f64)> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else { return Some((head.trim(), Vec::new(), value)) };
    let body = rest.strip_suffix('}')?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        if chars.next() != Some('"') {
            return None;
        }
        let mut val = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => val.extend(chars.next()),
                '"' => break,
                c => val.push(c),
            }
        }
        labels.push((key.trim_start_matches(',').to_string(), val));
        if chars.peek() == Some(&',') {
            chars.next();
        }
    }
    Some((name, labels, value))
}

pub fn label<'a>(labels: &'a [(String, String)], key: &str) -> &'a str {
    labels.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v.as_str())
}

impl Sample {
    pub fn new(by: By) -> Self {
        Self { by, ..Default::default() }
    }

    /// Adds one component's `/metrics` text; `component` names it (a node, or the gateway).
    pub fn add(&mut self, text: &str, component: &str) {
        for line in text.lines() {
            let Some((name, labels, value)) = parse_line(line) else { continue };
            if !matches!(label(&labels, "direction"), "outbound" | "ingress") {
                continue;
            }
            let service = label(&labels, "service").to_string();
            let pair = match self.by {
                By::Service => (label(&labels, "source_service").to_string(), service),
                By::Route => (service, label(&labels, "route").to_string()),
                By::Node => (component.to_string(), service),
            };
            match name {
                "quicmesh_requests_total" => {
                    let e = self.requests.entry(pair).or_default();
                    e.0 += value;
                    // A failure: a 5xx, or any answer a proxy made itself (404 no-route, 429
                    // rate-limited, 403 denied...); a client that left is not the service's.
                    let error = label(&labels, "error");
                    if label(&labels, "status_class") == "5xx" || !matches!(error, "" | "client-closed") {
                        e.1 += value;
                        let reason = if error.is_empty() {
                            format!("status {}", label(&labels, "code"))
                        } else {
                            error.to_string()
                        };
                        *self.errors.entry((label(&labels, "service").to_string(), reason)).or_default() += value;
                    }
                }
                "quicmesh_request_duration_seconds_bucket" => {
                    let le = match label(&labels, "le") {
                        "+Inf" => f64::INFINITY,
                        v => match v.parse() {
                            Ok(v) => v,
                            Err(_) => continue,
                        },
                    };
                    *self.buckets.entry(pair).or_default().entry(Bound(le)).or_default() += value;
                }
                _ => {}
            }
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub source: String,
    pub service: String,
    pub rps: f64,
    /// Share of answers neither 5xx nor made by a proxy, 0 to 1 (1 when idle).
    pub success: f64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// The rows for what happened between two samples taken `secs` apart.
pub fn rows(prev: &Sample, cur: &Sample, secs: f64) -> Vec<Row> {
    let mut out: Vec<Row> = cur
        .requests
        .iter()
        .map(|(pair, (total, errors))| {
            let (p_total, p_errors) = prev.requests.get(pair).copied().unwrap_or_default();
            let (n, bad) = ((total - p_total).max(0.0), (errors - p_errors).max(0.0));
            let delta: Vec<(f64, f64)> = cur
                .buckets
                .get(pair)
                .map(|b| {
                    b.iter()
                        .map(|(le, c)| {
                            let before = prev.buckets.get(pair).and_then(|p| p.get(le)).copied().unwrap_or(0.0);
                            (le.0, (c - before).max(0.0))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Row {
                source: pair.0.clone(),
                service: pair.1.clone(),
                rps: n / secs.max(1e-9),
                success: if n > 0.0 { 1.0 - bad / n } else { 1.0 },
                p50: quantile(&delta, 0.5),
                p99: quantile(&delta, 0.99),
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.service, &a.source).cmp(&(&b.service, &b.source)));
    out
}

/// Failed requests between two samples: (service, reason, count), most first.
pub fn errors(prev: &Sample, cur: &Sample) -> Vec<(String, String, f64)> {
    let mut out: Vec<(String, String, f64)> = cur
        .errors
        .iter()
        .map(|(k, v)| (k.0.clone(), k.1.clone(), (v - prev.errors.get(k).copied().unwrap_or(0.0)).max(0.0)))
        .filter(|e| e.2 > 0.0)
        .collect();
    out.sort_by(|a, b| b.2.total_cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
    out
}

/// A quantile from cumulative bucket counts, interpolating linearly inside the bucket.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            let inside = cum - below;
            let frac = if inside > 0.0 { (rank - below) / inside } else { 1.0 };
            return Some(lo + (le - lo) * frac);
        }
        (lo, below) = (le, cum);
    }
    Some(lo)
}

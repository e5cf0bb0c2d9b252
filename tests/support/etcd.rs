//! etcd for the gateway-replica tests and benches: Debian's `etcd-server`, one member or a
//! cluster of several, started by the test on free loopback ports with its data in a temporary
//! directory, removed on drop.

use std::net::SocketAddr;
use std::time::Duration;

use super::{eventually, http_get, require_tool};

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<std::process::Child>,
}

/// An etcd cluster (Debian's `etcd-server`), removed on drop.
pub struct Etcd {
    members: Vec<Member>,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// One member; `None` (the test skips) where etcd is not installed, outside CI.
    pub async fn start() -> Option<Etcd> {
        Self::cluster(1).await
    }

    /// A cluster of `n` members.
    pub async fn cluster(n: usize) -> Option<Etcd> {
        if !require_tool("etcd") {
            return None;
        }
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let members =
            (0..n).map(|i| Member { name: format!("m{i}"), client: free(), peer: free(), child: None }).collect();
        let mut etcd = Etcd { members, dir: tempfile::tempdir().unwrap() };
        etcd.resume().await;
        Some(etcd)
    }

    /// The client address of the first member.
    pub fn client(&self) -> SocketAddr {
        self.members[0].client
    }

    /// `"host:port", ...` of every member, for `gateway.store.etcd`.
    pub fn endpoints_toml(&self) -> String {
        self.members.iter().map(|m| format!("\"{}\"", m.client)).collect::<Vec<_>>().join(", ")
    }

    fn spawn(&mut self, i: usize) {
        let cluster =
            self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect::<Vec<_>>().join(",");
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let child = std::process::Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &format!("http://{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://{}", m.peer)])
            .args(["--initial-cluster", &cluster])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    /// Starts (again) every member that is not running, on the same ports and data, and waits
    /// until the cluster is healthy.
    pub async fn resume(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(i);
            }
        }
        let client = self.client();
        // A three-member cluster elects its leader only once all are up; with the suite's other
        // processes on two cores that once took longer than 30 s in CI.
        eventually(Duration::from_secs(90), "etcd to be healthy", || async {
            http_get(&format!("http://{client}/health")).await.1.contains("true").then_some(())
        })
        .await;
    }

    /// Every key under `prefix` and its value, as etcd holds them now.
    pub async fn range(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        let body = serde_json::json!({ "key": b64.encode(prefix), "range_end": b64.encode(end) }).to_string();
        let text = super::http_post_json(&format!("http://{}/v3/kv/range", self.client()), &body).await;
        let v: serde_json::Value = serde_json::from_str(&text).expect("etcd range");
        let decode = |v: &serde_json::Value| b64.decode(v.as_str().unwrap_or("")).unwrap();
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter().map(|kv| (String::from_utf8(decode(&kv["key"])).unwrap(), decode(&kv["value"]))).collect()
            })
            .unwrap_or_default()
    }

    /// Stops every member.
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the member that leads the cluster; returns its index.
    pub async fn kill_leader(&mut self) -> usize {
        let client = self.client();
        let status = super::http_post_json(&format!("http://{client}/v3/maintenance/status"), "{}").await;
        let v: serde_json::Value = serde_json::from_str(&status).expect("etcd status");
        let leader = v["leader"].as_str().expect("a leader").to_string();
        // Which member is it: ask each for its own id.
        for i in 0..self.members.len() {
            let c = self.members[i].client;
            let own = super::http_post_json(&format!("http://{c}/v3/maintenance/status"), "{}").await;
            let v: serde_json::Value = serde_json::from_str(&own).unwrap_or_default();
            if v["header"]["member_id"].as_str() == Some(leader.as_str()) {
                self.kill(i);
                return i;
            }
        }
        panic!("no member is the leader {leader}");
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

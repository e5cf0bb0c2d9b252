//! Baselines for the mesh hop with the same shape as a sidecar pair: two chained reverse proxies
//! with TLS 1.3 between them (client -> proxy -> TLS -> proxy -> backend), built from Debian's
//! nginx or haproxy when installed; skipped (and said so) otherwise. Caddy, when installed, is
//! the HTTP/3 ingress baseline for the gateway. For the TCP tunnel, the peer is a haproxy pair
//! in `mode tcp` with TLS between the two (the shape of ztunnel's HBONE).
//!
//! Each peer proxy runs as many workers as a node does by default (`node.workers = 1`): one
//! nginx worker process, one haproxy thread. `BENCH_PEER_WORKERS` sets another count (2 gives
//! the earlier rows, where nginx spread each proxy over both cores of this machine).

pub mod bare;
pub mod pool;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Two running proxies; the client talks plain HTTP/1.1 to `front`.
pub struct ProxyPair {
    pub front: SocketAddr,
    procs: Vec<Child>,
    /// Worker processes each of `procs` forks (nginx; 0 for the others); their CPU counts too.
    children: usize,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn installed(tool: &str, flag: &str) -> bool {
    let ok = Command::new(tool).arg(flag).output().is_ok();
    if !ok {
        eprintln!("{tool} is not installed: the {tool} baseline is SKIPPED");
    }
    ok
}

impl ProxyPair {
    /// Waits until both listen and, for nginx, every master has forked its workers (the
    /// listening socket comes first, and workers missing from `pids` would go uncounted);
    /// `None` (and a SKIPPED line) if that does not happen within 10 s.
    fn ready(self, back_port: u16, tool: &str) -> Option<ProxyPair> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(self.front).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", back_port)).is_ok()
                && self.pids().len() >= self.procs.len() * (1 + self.children)
            {
                return Some(self);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{tool} did not start: the {tool} baseline is SKIPPED");
        None
    }

    /// Every process of both proxies (for nginx, masters and their workers).
    pub fn pids(&self) -> Vec<u32> {
        Self::tree(&self.procs, self.children)
    }

    /// The processes of the proxy clients talk to (started last), for an edge's own CPU.
    pub fn front_pids(&self) -> Vec<u32> {
        Self::tree(&self.procs[self.procs.len() - 1..], self.children)
    }

    fn tree(procs: &[Child], children: usize) -> Vec<u32> {
        let mut pids = Vec::new();
        for p in procs {
            pids.push(p.id());
            if children > 0 {
                if let Ok(out) = Command::new("pgrep").args(["-P", &p.id().to_string()]).output() {
                    pids.extend(
                        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse::<u32>().ok()),
                    );
                }
            }
        }
        pids
    }
}

impl Drop for ProxyPair {
    fn drop(&mut self) {
        let pids = self.pids();
        for child in &mut self.procs {
            let _ = child.kill();
            let _ = child.wait();
        }
        // nginx workers exit with their master; make sure.
        for pid in pids {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

fn self_signed() -> (String, String) {
    quicmesh_shared::identity::self_signed_pem(&["localhost".to_string()]).unwrap()
}

/// Workers per peer proxy: nginx worker processes per master (the pair's CPU counts them
/// all), haproxy threads; a node's default unless `BENCH_PEER_WORKERS` says otherwise.
pub fn workers() -> usize {
    std::env::var("BENCH_PEER_WORKERS").ok().and_then(|v| v.parse().ok()).filter(|&n| n > 0).unwrap_or(1)
}

fn nginx_conf(dir: &Path, name: &str, server: &str, upstream: &str) -> String {
    nginx_conf_with(dir, name, workers(), server, upstream)
}

fn nginx_conf_with(dir: &Path, name: &str, workers: usize, server: &str, upstream: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes {workers};\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/{name}-cb;\n  proxy_temp_path {d}/{name}-pt;\n\
           fastcgi_temp_path {d}/{name}-ft;\n  uwsgi_temp_path {d}/{name}-ut;\n  scgi_temp_path {d}/{name}-st;\n\
           upstream next {{ {upstream} keepalive 64; }}\n  {server}\n}}\n"
    )
}

fn run_nginx(dir: &Path, name: &str, text: &str) -> Child {
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, text).unwrap();
    Command::new("nginx")
        .arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join(format!("{name}.early.err")))
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// nginx 1.x, [`workers`] each, keep-alive on both upstream legs.
pub fn nginx(dir: &Path, backend: SocketAddr) -> Option<ProxyPair> {
    if !installed("nginx", "-v") {
        return None;
    }
    let (cert, key) = self_signed();
    std::fs::write(dir.join("nginx.pem"), cert).unwrap();
    std::fs::write(dir.join("nginx.key"), key).unwrap();
    let (p1, p2) = (free_port(), free_port());
    let d = dir.display();
    let back = nginx_conf(
        dir,
        "nginx-back",
        &format!(
            "server {{ listen 127.0.0.1:{p2} ssl; ssl_certificate {d}/nginx.pem; ssl_certificate_key {d}/nginx.key;\n\
             ssl_protocols TLSv1.3; keepalive_requests 1000000;\n\
             location / {{ proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
        &format!("server {backend};"),
    );
    let front = nginx_conf(
        dir,
        "nginx-front",
        &format!(
            "server {{ listen 127.0.0.1:{p1}; keepalive_requests 1000000;\n\
             location / {{ proxy_pass https://next; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
             proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3; }} }}"
        ),
        &format!("server 127.0.0.1:{p2};"),
    );
    let procs = vec![run_nginx(dir, "nginx-back", &back), run_nginx(dir, "nginx-front", &front)];
    ProxyPair { front: ([127, 0, 0, 1], p1).into(), procs, children: workers() }.ready(p2, "nginx")
}

/// nginx terminating TLS 1.3 at the edge (HTTP/1.1 and HTTP/2 on one port, ALPN), `workers`
/// worker processes (as many as the gateway has threads), proxying over TLS 1.3 (a keep-alive
/// pool, sessions reused) to a second nginx that proxies to `backend`: the shape of the gateway's
/// HTTP/1.1 and HTTP/2 ingress, which goes on over mutual-TLS QUIC to node-b. `front` is the
/// edge's TLS port; [`ProxyPair::front_pids`] are the edge's processes; `name` names the files.
/// With `forwarding`, the edge adds the request headers the gateway adds by default, as far as
/// nginx has them without modules: `X-Forwarded-For`, `X-Forwarded-Proto`, an RFC 7239
/// `Forwarded` element and `X-Request-Id` (not W3C `traceparent`).
pub fn nginx_edge(dir: &Path, name: &str, backend: SocketAddr, workers: usize, forwarding: bool) -> Option<ProxyPair> {
    if !installed("nginx", "-v") {
        return None;
    }
    let (cert, key) = self_signed();
    std::fs::write(dir.join(format!("{name}.pem")), cert).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    let (p1, p2) = (free_port(), free_port());
    let d = dir.display();
    let tls = format!("ssl_certificate {d}/{name}.pem; ssl_certificate_key {d}/{name}.key; ssl_protocols TLSv1.3;");
    let back = nginx_conf_with(
        dir,
        &format!("{name}-back"),
        workers,
        &format!(
            "server {{ listen 127.0.0.1:{p2} ssl; {tls} keepalive_requests 1000000;\n\
             location / {{ proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
        &format!("server {backend};"),
    );
    let headers = if forwarding {
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for; proxy_set_header X-Forwarded-Proto $scheme;\n\
         proxy_set_header Forwarded \"for=\\\"$remote_addr\\\";proto=https;host=\\\"$host\\\"\";\n\
         proxy_set_header X-Request-Id $request_id;\n"
    } else {
        ""
    };
    let front = nginx_conf_with(
        dir,
        name,
        workers,
        &format!(
            "server {{ listen 127.0.0.1:{p1} ssl http2; {tls} keepalive_requests 1000000;\n\
             http2_max_concurrent_streams 1024;\n\
             location / {{ proxy_pass https://next; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
             {headers}proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3; }} }}"
        ),
        &format!("server 127.0.0.1:{p2};"),
    );
    let procs = vec![run_nginx(dir, &format!("{name}-back"), &back), run_nginx(dir, name, &front)];
    ProxyPair { front: ([127, 0, 0, 1], p1).into(), procs, children: workers }.ready(p2, "nginx edge")
}

fn run_haproxy(dir: &Path, name: &str, mode: &str, frontend: &str, server: &str) -> Child {
    let text = format!(
        "global\n  maxconn 5000\n  nbthread {}\n\
         defaults\n  mode {mode}\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend f\n  {frontend}\n  default_backend b\n\
         backend b\n  {server}\n",
        workers()
    );
    let path = dir.join(format!("{name}.cfg"));
    std::fs::write(&path, text).unwrap();
    Command::new("haproxy").arg("-db").arg("-f").arg(&path).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

/// Two haproxy instances, [`workers`] threads each, in `mode` (`http` with connection reuse
/// toward the second one, or `tcp`), plain in at the front, TLS 1.3 between them, plain out
/// of the back to `target`. `name` names their files.
fn haproxy_pair(dir: &Path, name: &str, mode: &str, target: SocketAddr) -> Option<ProxyPair> {
    if !installed("haproxy", "-v") {
        return None;
    }
    // haproxy wants the certificate and its key in one file.
    let (cert, key) = self_signed();
    let pem = dir.join(format!("{name}.pem"));
    std::fs::write(&pem, format!("{cert}{key}")).unwrap();
    let (p1, p2) = (free_port(), free_port());
    let procs = vec![
        run_haproxy(
            dir,
            &format!("{name}-back"),
            mode,
            &format!("bind 127.0.0.1:{p2} ssl crt {} ssl-min-ver TLSv1.3", pem.display()),
            &format!("server s1 {target}"),
        ),
        run_haproxy(
            dir,
            &format!("{name}-front"),
            mode,
            &format!("bind 127.0.0.1:{p1}"),
            &format!("server s1 127.0.0.1:{p2} ssl verify none ssl-min-ver TLSv1.3"),
        ),
    ];
    ProxyPair { front: ([127, 0, 0, 1], p1).into(), procs, children: 0 }.ready(p2, name)
}

/// haproxy 2.x as an HTTP proxy pair, connection reuse toward the second one.
pub fn haproxy(dir: &Path, backend: SocketAddr) -> Option<ProxyPair> {
    haproxy_pair(dir, "haproxy", "http\n  http-reuse always", backend)
}

/// A TLS-over-TCP tunnel pair: haproxy in `mode tcp`, plain TCP in at the front, TLS 1.3
/// between the two, plain TCP out of the back to `sink`; each connection is one TLS
/// connection across (no multiplexing: haproxy has none for TCP).
pub fn haproxy_tunnel(dir: &Path, sink: SocketAddr) -> Option<ProxyPair> {
    haproxy_pair(dir, "haproxy-tunnel", "tcp", sink)
}

/// Caddy 2 as an HTTPS ingress (HTTP/1.1, HTTP/2 and HTTP/3 on one port, TCP and UDP) in
/// front of `backend`, with a self-signed certificate for localhost. One process: `front` is
/// its TLS/QUIC port. `threads` sets `GOMAXPROCS` (None: Go's default, a thread per core), so
/// that it runs on as many threads as the gateway it is compared with; `name` names its files.
pub fn caddy(dir: &Path, name: &str, backend: SocketAddr, threads: Option<usize>) -> Option<ProxyPair> {
    if !installed("caddy", "version") {
        return None;
    }
    let (cert, key) = self_signed();
    let (cert_path, key_path) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let port = free_udp_and_tcp_port();
    // No admin API, no automatic certificates or redirects (which would bind port 80), no
    // access log (Caddy logs nothing per request unless asked).
    let text = format!(
        "{{\n\tadmin off\n\tauto_https off\n\tservers {{\n\t\tprotocols h1 h2 h3\n\t}}\n}}\n\
         https://localhost:{port} {{\n\tbind 127.0.0.1\n\ttls {} {}\n\treverse_proxy {backend}\n}}\n",
        cert_path.display(),
        key_path.display()
    );
    let conf = dir.join(format!("{name}.Caddyfile"));
    std::fs::write(&conf, text).unwrap();
    let home = dir.join(format!("{name}-home"));
    let _ = std::fs::create_dir_all(&home);
    let log_path = dir.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new("caddy");
    cmd.args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&conf)
        // Caddy keeps its state under these; keep it inside the bench's directory.
        .env("HOME", &home)
        .env("XDG_DATA_HOME", &home)
        .env("XDG_CONFIG_HOME", &home)
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(n) = threads {
        cmd.env("GOMAXPROCS", n.to_string());
    }
    let child = cmd.spawn().unwrap();
    let caddy = ProxyPair { front: ([127, 0, 0, 1], port).into(), procs: vec![child], children: 0 };
    let caddy = caddy.ready(port, "caddy")?;
    // The UDP (HTTP/3) listener comes up after the TCP one: wait for its line in the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("enabling HTTP/3 listener") && log.contains("server running") {
            return Some(caddy);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("caddy's HTTP/3 listener did not start: the Caddy baseline is SKIPPED");
    None
}

/// A port free on loopback for both TCP and UDP at the time of asking.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let port = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

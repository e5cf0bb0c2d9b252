//! A pair of chained nginx reverse proxies with TLS between them: the same shape as a sidecar
//! pair (client -> proxy -> TLS -> proxy -> backend), as a baseline for the mesh hop. Used when
//! Debian's `nginx` is installed; skipped otherwise.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct NginxPair {
    /// Where the client sends plain HTTP/1.1.
    pub front: SocketAddr,
    front_proc: Child,
    back_proc: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn conf(dir: &Path, name: &str, server: &str, upstream: &str) -> String {
    let d = dir.display();
    format!(
        "worker_processes 2;\ndaemon off;\npid {d}/{name}.pid;\nerror_log {d}/{name}.err warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/{name}-cb;\n  proxy_temp_path {d}/{name}-pt;\n\
           fastcgi_temp_path {d}/{name}-ft;\n  uwsgi_temp_path {d}/{name}-ut;\n  scgi_temp_path {d}/{name}-st;\n\
           upstream next {{ {upstream} keepalive 64; }}\n  {server}\n}}\n"
    )
}

fn run(dir: &Path, name: &str, text: &str) -> Child {
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

impl NginxPair {
    /// Starts both proxies in `dir`, the second one terminating TLS 1.3 and forwarding to
    /// `backend` over keep-alive HTTP/1.1, the first one calling it over TLS with keep-alive.
    pub fn start(dir: &Path, backend: SocketAddr) -> Option<NginxPair> {
        if Command::new("nginx").arg("-v").output().is_err() {
            eprintln!("nginx is not installed: the nginx pair baseline is SKIPPED");
            return None;
        }
        let (cert, key) = quicmesh_shared::identity::self_signed_pem(&["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("nginx.pem"), cert).unwrap();
        std::fs::write(dir.join("nginx.key"), key).unwrap();
        let (p1, p2) = (free_port(), free_port());
        let d = dir.display();
        let back = conf(
            dir,
            "nginx-back",
            &format!(
                "server {{ listen 127.0.0.1:{p2} ssl; ssl_certificate {d}/nginx.pem; ssl_certificate_key {d}/nginx.key;\n\
                 ssl_protocols TLSv1.3; keepalive_requests 1000000;\n\
                 location / {{ proxy_pass http://next; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
            ),
            &format!("server {backend};"),
        );
        let front = conf(
            dir,
            "nginx-front",
            &format!(
                "server {{ listen 127.0.0.1:{p1}; keepalive_requests 1000000;\n\
                 location / {{ proxy_pass https://next; proxy_http_version 1.1; proxy_set_header Connection \"\";\n\
                 proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3; }} }}"
            ),
            &format!("server 127.0.0.1:{p2};"),
        );
        let back_proc = run(dir, "nginx-back", &back);
        let front_proc = run(dir, "nginx-front", &front);
        let pair = NginxPair { front: ([127, 0, 0, 1], p1).into(), front_proc, back_proc };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(pair.front).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", p2)).is_ok()
            {
                return Some(pair);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("nginx did not start (see {}): the nginx pair baseline is SKIPPED", dir.display());
        None
    }

    /// Every process of both proxies (masters and their workers).
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for master in [self.front_proc.id(), self.back_proc.id()] {
            pids.push(master);
            if let Ok(out) = Command::new("pgrep").args(["-P", &master.to_string()]).output() {
                pids.extend(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse::<u32>().ok()));
            }
        }
        pids
    }
}

impl Drop for NginxPair {
    fn drop(&mut self) {
        for child in [&mut self.front_proc, &mut self.back_proc] {
            let _ = child.kill();
            let _ = child.wait();
        }
        // The workers exit with their master (nginx workers watch it); make sure.
        for pid in self.pids() {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

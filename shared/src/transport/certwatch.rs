//! Certificates of members that nobody renews over a control stream (static nodes, the
//! gateway): their files are watched and reloaded when they change (new connections use them,
//! both ways; established ones carry on), their expiry is exported, and a warning is logged
//! from a third of the lifetime left. A gateway holding the CA key renews its own.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{info, warn};

use crate::config::watch::FileWatch;
use crate::config::{TlsPaths, TransportConfig};
use crate::identity::{self, Ca, Credentials};
use crate::telemetry::metrics as m;

/// How often the files are looked at.
const EVERY: Duration = Duration::from_secs(2);
/// How often the expiry warning is repeated.
const WARN_EVERY: Duration = Duration::from_secs(3600);

/// What the watcher needs to install new credentials.
pub struct Watch {
    /// The trust domain the certificate must belong to.
    pub trust_domain: String,
    /// Installs the client side of new credentials (the peer pool's dialer).
    pub install: Arc<dyn Fn(quinn::ClientConfig) + Send + Sync>,
    pub endpoint: quinn::Endpoint,
    pub paths: TlsPaths,
    pub name: String,
    pub transport: TransportConfig,
    /// How the endpoint accepts peers (its server side is renewed with the certificate).
    pub serve: crate::transport::Serve,
    /// The gateway sends the CA along with its certificate (joining nodes pin it).
    pub send_ca: bool,
    /// The gateway's CA, to renew its own certificate with.
    pub ca: Option<Ca>,
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// The certificate's validity (Unix seconds), read from its file.
fn validity(paths: &TlsPaths) -> Option<(i64, i64)> {
    identity::read_certs(&paths.cert).ok()?.first().and_then(|c| identity::validity(c))
}

impl Watch {
    /// Runs until the process ends. The files are watched from this call on (not from the
    /// future's first poll), so what the watch holds open is there before the caller goes on.
    pub fn run(self) -> impl std::future::Future<Output = ()> + Send {
        let files = [self.paths.ca.clone(), self.paths.cert.clone(), self.paths.key.clone()];
        let watch = FileWatch::new(move || files.to_vec(), EVERY, EVERY / 4);
        self.serve(watch)
    }

    async fn serve<F: Fn() -> Vec<std::path::PathBuf> + Send>(self, mut watch: FileWatch<F>) {
        let mut warned: Option<tokio::time::Instant> = None;
        // Read again only when the files change: a look at them costs their metadata, not
        // the certificate parsed anew every interval.
        let mut v = validity(&self.paths);
        self.export(v, &mut warned);
        loop {
            if watch.tick().await {
                v = validity(&self.paths);
                match self.reload() {
                    Ok(until) => {
                        warned = None;
                        info!(cert = %self.paths.cert.display(), valid_until_unix = until, "certificate files changed; new connections use them");
                    }
                    Err(e) => {
                        warn!(cert = %self.paths.cert.display(), "certificate files changed but cannot be used; keeping the previous ones: {e}")
                    }
                }
            }
            self.export(v, &mut warned);
            if let (Some(ca), Some((not_before, not_after))) = (&self.ca, v) {
                let lifetime = (not_after - not_before).max(0);
                if not_after - now_unix() < lifetime / 3 {
                    match ca.issue(&self.name, Duration::from_secs(lifetime.max(3600) as u64)) {
                        Ok(_) => info!(name = self.name, "own certificate renewed from the local CA"),
                        Err(e) => warn!(name = self.name, "cannot renew the own certificate: {e}"),
                    }
                }
            }
        }
    }

    /// Publishes the expiry and warns when less than a third of the lifetime is left.
    fn export(&self, validity: Option<(i64, i64)>, warned: &mut Option<tokio::time::Instant>) {
        let Some((not_before, not_after)) = validity else { return };
        metrics::gauge!(m::CERT_EXPIRY).set(not_after as f64);
        let left = not_after - now_unix();
        let lifetime = (not_after - not_before).max(0);
        if left >= lifetime / 3 || warned.is_some_and(|w| w.elapsed() < WARN_EVERY) {
            return;
        }
        *warned = Some(tokio::time::Instant::now());
        let dir = self.paths.cert.parent().map_or_else(|| ".".into(), |d| d.display().to_string());
        if left <= 0 {
            warn!(cert = %self.paths.cert.display(), "the certificate has EXPIRED: peers refuse new connections; issue a new one (`quicmesh ca issue --dir {dir} --node {}`), it is picked up without a restart", self.name);
        } else {
            let left = humantime::format_duration(Duration::from_secs(left as u64));
            warn!(cert = %self.paths.cert.display(), expires_in = %left, "the certificate expires soon; issue a new one (`quicmesh ca issue --dir {dir} --node {}`), it is picked up without a restart", self.name);
        }
    }

    /// Loads the files, checks them, and installs them for new connections.
    fn reload(&self) -> Result<i64, String> {
        let mut creds =
            Credentials::load_member(&self.paths, &self.trust_domain, &self.name).map_err(|e| e.to_string())?;
        let until = creds.chain.first().and_then(|c| identity::validity(c)).map_or(0, |v| v.1);
        if self.send_ca {
            creds.chain.extend(creds.roots.iter().cloned());
        }
        let client = crate::transport::reconfigure(
            &self.endpoint,
            &creds,
            &self.trust_domain,
            &self.transport,
            Some(self.serve.clone()),
        )
        .map_err(|e| e.to_string())?;
        (self.install)(client);
        Ok(until)
    }
}

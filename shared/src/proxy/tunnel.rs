//! TCP through the mesh: an opaque byte stream to a TCP endpoint, carried by its node as a
//! CONNECT stream.

use http::{HeaderValue, Method, Request, Uri};

use super::mesh::Call;
use super::mesh::RequestStream;
use super::table::Service;
use crate::config::EndpointConfig;
use crate::message::error::{ProxyError, ERROR_HEADER};
use crate::message::headers;
use crate::transport::pool::Hold;

impl Call<'_> {
    /// Opens an opaque byte stream to a TCP endpoint through its node (a CONNECT), with
    /// what keeps its connection open for as long as the tunnel lasts.
    pub async fn connect_tcp(&self, svc: &Service, ep: &EndpointConfig) -> Result<(RequestStream, Hold), ProxyError> {
        let timeout = self.table.config().timeouts.connect;
        let (stream, hold, resp) = self
            .open(svc, ep, http::HeaderMap::new(), timeout)
            .await
            .map_err(|e| e.unwrap_or(ProxyError::ConnectTimeout(format!("tunnel to {}", ep.address))))?;
        if !resp.status().is_success() {
            let reason = resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("refused");
            return Err(ProxyError::UpstreamUnreachable { addr: ep.address.to_string(), reason: reason.to_string() });
        }
        Ok((stream, hold))
    }

    /// Opens an upgrade stream to `ep`'s node: `head` is the upgrade request's headers with
    /// `upgrade::UPGRADE_HEADER` and `upgrade::PATH_HEADER`. The answer is 200 with the
    /// instance's `101` headers once it switched, or the refusal (the instance's, or the node's
    /// own with `quicmesh-error`).
    pub async fn connect_upgrade(
        &self,
        svc: &Service,
        ep: &EndpointConfig,
        head: http::HeaderMap,
    ) -> Result<(RequestStream, Hold, http::Response<()>), ProxyError> {
        // The peer answers once its instance did: as long as a request may take.
        let timeout = self.table.config().timeouts.connect.saturating_add(self.table.config().timeouts.request);
        self.open(svc, ep, head, timeout).await.map_err(|e| e.unwrap_or(ProxyError::Timeout(timeout)))
    }

    /// Sends a CONNECT for `svc` at `ep` with `head` and waits up to `timeout` for its answer;
    /// `Err(None)` when that passed.
    async fn open(
        &self,
        svc: &Service,
        ep: &EndpointConfig,
        head: http::HeaderMap,
        timeout: std::time::Duration,
    ) -> Result<(RequestStream, Hold, http::Response<()>), Option<ProxyError>> {
        let pc = self.peer(ep).await?;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() =
            Uri::try_from(format!("https://{}/", ep.address)).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        *req.headers_mut() = head;
        req.headers_mut().insert(headers::SERVICE, header_value(&svc.config.name)?);
        req.headers_mut().insert(headers::ENDPOINT, header_value(&ep.address.to_string())?);
        if let Some(source) = self.table.source_service() {
            req.headers_mut().insert(headers::SOURCE, header_value(source)?);
        }
        // A tunnel carries anything: never in 0-RTT.
        pc.ready_for(&Method::CONNECT).await.map_err(Some)?;
        let mut stream = match pc.open(req).await {
            Ok(s) => s,
            // The client's head, too large for the peer: the connection stays.
            Err(e) if e.head_too_large() => return Err(Some(ProxyError::HeadTooLarge(e.to_string()))),
            Err(e) => {
                self.mesh.pool().evict(&ep.node, &pc.conn).await;
                return Err(Some(ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() }));
            }
        };
        let resp = tokio::time::timeout(timeout, stream.recv_response())
            .await
            .map_err(|_| None)?
            .map_err(|e| ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() })?;
        Ok((stream, pc.hold(), resp))
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ProxyError> {
    HeaderValue::from_str(s).map_err(|_| ProxyError::BadRequest(format!("unusable header value {s:?}")))
}

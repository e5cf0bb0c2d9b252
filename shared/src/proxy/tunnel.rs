//! TCP through the mesh: an opaque byte stream to a TCP endpoint, carried by its node as an
//! HTTP/3 CONNECT stream.

use http::{HeaderValue, Method, Request, Uri};

use super::mesh::Call;
use super::mesh::RequestStream;
use super::table::Service;
use crate::config::EndpointConfig;
use crate::message::error::{ProxyError, ERROR_HEADER};
use crate::message::headers;
use crate::transport::pool::Hold;

impl Call<'_> {
    /// Opens an opaque byte stream to a TCP endpoint through its node (HTTP/3 CONNECT), with
    /// what keeps its connection open for as long as the tunnel lasts.
    pub async fn connect_tcp(&self, svc: &Service, ep: &EndpointConfig) -> Result<(RequestStream, Hold), ProxyError> {
        let (pc, _) = self.peer(ep).await?;
        let mut req = Request::new(());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() =
            Uri::try_from(format!("https://{}/", ep.address)).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        req.headers_mut().insert(headers::SERVICE, header_value(&svc.config.name)?);
        req.headers_mut().insert(headers::ENDPOINT, header_value(&ep.address.to_string())?);
        if let Some(source) = self.table.source_service() {
            req.headers_mut().insert(headers::SOURCE, header_value(source)?);
        }
        let mut sender = pc.h3.clone();
        let mut stream = match sender.send_request(req).await {
            Ok(s) => s,
            Err(e) => {
                self.mesh.pool().evict(&ep.node, &pc.conn).await;
                return Err(ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() });
            }
        };
        let timeout = self.table.config().timeouts.connect;
        let resp = tokio::time::timeout(timeout, stream.recv_response())
            .await
            .map_err(|_| ProxyError::ConnectTimeout(format!("tunnel to {}", ep.address)))?
            .map_err(|e| ProxyError::PeerUnreachable { peer: ep.node.clone(), reason: e.to_string() })?;
        if !resp.status().is_success() {
            let reason = resp.headers().get(ERROR_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("refused");
            return Err(ProxyError::UpstreamUnreachable { addr: ep.address.to_string(), reason: reason.to_string() });
        }
        Ok((stream, pc.hold()))
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ProxyError> {
    HeaderValue::from_str(s).map_err(|_| ProxyError::BadRequest(format!("unusable header value {s:?}")))
}

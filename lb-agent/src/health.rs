//! Health endpoints as kube-proxy serves them: one server per healthCheckNodePort of an
//! externalTrafficPolicy Local Service (200 with the local endpoint count while there is one,
//! 503 when there is none), and the node-level `/healthz` and `/livez` (`--healthz-addr`).
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::http::{self, Response};
use crate::model::HealthCheck;

/// The body kube-proxy's health check server returns.
pub fn service_health(hc: &HealthCheck) -> Response {
    let body = json!({
        "service": {"namespace": hc.namespace, "name": hc.name},
        "localEndpoints": hc.local_endpoints,
        "serviceProxyHealthy": true,
    });
    let status = if hc.local_endpoints > 0 { 200 } else { 503 };
    Response::new(status, "application/json", body.to_string())
}

/// The per-Service health check servers, kept in line with the model by [`Self::set`].
#[derive(Default)]
pub struct HealthServers {
    state: Arc<RwLock<BTreeMap<u16, HealthCheck>>>,
    listeners: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthServers {
    /// Serve exactly `wanted`: listen on new ports (all of the node's addresses), stop
    /// listening on ports no longer wanted, and answer with the new counts. Returns the
    /// ports that could not be bound, with why; the others are still served, and a failed
    /// port is tried again on the next call.
    pub async fn set(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, String)> {
        if let Ok(mut s) = self.state.write() {
            *s = wanted.clone();
        }
        self.listeners.retain(|port, task| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
            }
            keep
        });
        let mut failed = Vec::new();
        for port in wanted.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            match TcpListener::bind(addr).await {
                Ok(l) => {
                    let state = self.state.clone();
                    let port = *port;
                    let handler: http::Handler = Arc::new(move |_path| {
                        let hc = state.read().ok().and_then(|s| s.get(&port).cloned());
                        Box::pin(async move {
                            match hc {
                                Some(hc) => service_health(&hc),
                                None => Response::new(503, "text/plain", "not served\n".into()),
                            }
                        })
                    });
                    self.listeners.insert(port, http::serve(l, handler));
                }
                Err(e) => failed.push((*port, format!("binding {addr}: {e}"))),
            }
        }
        failed
    }

    /// Ports listened on now.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for HealthServers {
    fn drop(&mut self) {
        for task in self.listeners.values() {
            task.abort();
        }
    }
}

/// The node-level health state: when the maps were last programmed.
#[derive(Debug, Default, Clone)]
pub struct NodeHealth {
    pub last_sync: Option<SystemTime>,
}

/// `/healthz` and `/livez`: 200 once the agent has programmed the maps, 503 before; the
/// body says when (`lastUpdated`) and now (`currentTime`), as kube-proxy's does.
pub fn node_health(h: &NodeHealth, path: &str) -> Response {
    let path = path.split('?').next().unwrap_or(path);
    if path != "/healthz" && path != "/livez" {
        return Response::new(404, "text/plain", "try /healthz or /livez\n".into());
    }
    let ts = |t: SystemTime| {
        Timestamp::try_from(t)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    let body = json!({
        "lastUpdated": h.last_sync.map(ts).unwrap_or_default(),
        "currentTime": ts(SystemTime::now()),
        "nodeEligible": true,
    });
    let status = if h.last_sync.is_some() { 200 } else { 503 };
    Response::new(status, "application/json", body.to_string())
}

/// Serves [`node_health`] on `addr`.
pub async fn serve_node_health(
    addr: SocketAddr,
    state: Arc<RwLock<NodeHealth>>,
) -> std::io::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    let handler: http::Handler = Arc::new(move |path| {
        let h = state.read().map(|h| h.clone()).unwrap_or_default();
        Box::pin(async move { node_health(&h, &path) })
    });
    Ok(http::serve(listener, handler))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hc(n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "default".into(),
            name: "web".into(),
            local_endpoints: n,
        }
    }

    #[test]
    fn service_health_is_200_with_local_endpoints_and_503_without() {
        let r = service_health(&hc(2));
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
        assert_eq!(
            v,
            json!({"service": {"namespace": "default", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        let r = service_health(&hc(0));
        assert_eq!(r.status, 503);
        assert!(r.body.contains("\"localEndpoints\":0"), "{}", r.body);
    }

    #[test]
    fn node_health_waits_for_the_first_sync() {
        let before = NodeHealth::default();
        assert_eq!(node_health(&before, "/healthz").status, 503);
        let after = NodeHealth {
            last_sync: Some(SystemTime::now()),
        };
        for path in ["/healthz", "/livez", "/livez?verbose"] {
            let r = node_health(&after, path);
            assert_eq!(r.status, 200, "{path}");
            let v: serde_json::Value = serde_json::from_str(&r.body).expect("json");
            assert!(
                v["lastUpdated"].as_str().is_some_and(|s| s.contains('T')),
                "{v}"
            );
        }
        assert_eq!(node_health(&after, "/metrics").status, 404);
    }
}

//! Kubernetes object builders shared by the integration tests (typed k8s-openapi objects
//! with the fields the agent reads).
#![allow(dead_code, reason = "each test binary uses a different subset")]

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Node, NodeAddress, NodeStatus, Pod, PodSpec, PodStatus, Service,
    ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use lb_agent::model;

pub fn meta(ns: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: ns.map(str::to_string),
        ..Default::default()
    }
}

/// A Service of type `ty` with one port `http` -> 8080/TCP.
pub fn service(
    name: &str,
    ty: &str,
    cluster_ip: &str,
    port: i32,
    node_port: Option<i32>,
) -> Service {
    Service {
        metadata: meta(Some("default"), name),
        spec: Some(ServiceSpec {
            type_: Some(ty.to_string()),
            cluster_ip: Some(cluster_ip.to_string()),
            cluster_ips: Some(vec![cluster_ip.to_string()]),
            selector: Some([("app".to_string(), name.to_string())].into()),
            ports: Some(vec![ServicePort {
                name: Some("http".to_string()),
                port,
                node_port,
                protocol: Some("TCP".to_string()),
                target_port: Some(IntOrString::Int(8080)),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A slice of ready endpoints `(ip, node)` serving port `http` on 8080/TCP.
pub fn slice(name: &str, service: &str, endpoints: &[(&str, &str)]) -> EndpointSlice {
    let mut m = meta(Some("default"), name);
    m.labels = Some([(model::SERVICE_NAME_LABEL.to_string(), service.to_string())].into());
    EndpointSlice {
        metadata: m,
        address_type: "IPv4".to_string(),
        endpoints: Some(
            endpoints
                .iter()
                .map(|(ip, node)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    node_name: Some(node.to_string()),
                    ..Default::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_string()),
            port: Some(8080),
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
    }
}

/// A running pod with one container port 80/TCP, published on `host_port` if given.
pub fn pod(name: &str, node: &str, ip: &str, host_port: Option<i32>) -> Pod {
    Pod {
        metadata: meta(Some("default"), name),
        spec: Some(PodSpec {
            node_name: Some(node.to_string()),
            containers: vec![Container {
                name: "c".to_string(),
                ports: Some(vec![ContainerPort {
                    container_port: 80,
                    host_port,
                    protocol: Some("TCP".to_string()),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".to_string()),
            pod_ip: Some(ip.to_string()),
            ..Default::default()
        }),
    }
}

pub fn node(name: &str, ip: &str) -> Node {
    Node {
        metadata: meta(None, name),
        status: Some(NodeStatus {
            addresses: Some(vec![NodeAddress {
                type_: "InternalIP".to_string(),
                address: ip.to_string(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

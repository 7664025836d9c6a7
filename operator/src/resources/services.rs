use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{CLIENT_PORT, Cluster, METRICS_PORT, PEER_PORT, client_service_name, labels};

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port: number,
        target_port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// Headless: gives each member a stable DNS name. Not-ready members are published because
/// members must reach each other to elect the leader that makes them ready; the metrics
/// port is here so each member can be scraped on its own.
pub(super) fn peer(cluster: &Cluster<'_>) -> Service {
    Service {
        metadata: cluster.metadata(cluster.peer_service_name()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels::selector(cluster.name)),
            ports: Some(vec![
                port("client", CLIENT_PORT),
                port("peer", PEER_PORT),
                port("metrics", METRICS_PORT),
            ]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// What applications connect to: ready members only.
pub(super) fn client(cluster: &Cluster<'_>) -> Service {
    Service {
        metadata: cluster.metadata(client_service_name(cluster.name)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(labels::selector(cluster.name)),
            ports: Some(vec![port("client", CLIENT_PORT)]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

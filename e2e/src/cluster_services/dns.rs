//! Cluster DNS answers: a pure function from one question and a snapshot of Services and
//! EndpointSlices (discovery.k8s.io/v1) to the records of the answer. The sockets are in
//! `dns_server`.
//!
//! The names follow Kubernetes' DNS specification (as CoreDNS serves it in kind):
//! - `<svc>.<ns>.svc.<domain>` A: the Service's endpoint addresses.
//! - `<hostname>.<svc>.<ns>.svc.<domain>` A: the endpoint whose `hostname` is that label (the
//!   members of a StatefulSet behind its headless Service), or whose address written with dashes
//!   is that label (`10-244-1-5.<svc>...`, as CoreDNS names endpoints that have no hostname).
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>` SRV: one record per endpoint and named port,
//!   its target the endpoint's own name above (its A record is added to the additional section).
//! - `<a-b-c-d>.<ns>.pod.<domain>` A: the address spelled by the label, unchecked (CoreDNS's
//!   `pods insecure`, kind's default).
//! - An ExternalName Service: a CNAME to its external name (which itself is then refused).
//!
//! The difference from kind: there is no kube-proxy here, so a ClusterIP is unreachable (the
//! platform routes the Service range nowhere). A ClusterIP Service's name is therefore answered
//! like a headless Service's, with its endpoints' pod addresses rather than its ClusterIP: a
//! client connects to a pod directly, and gets no load balancing beyond the resolver's own
//! choice among the addresses.
//!
//! Which endpoints count: the ready ones, and the not-ready ones too when the Service sets
//! `spec.publishNotReadyAddresses` (the EndpointSlice controller itself already reports those
//! as ready; applying the rule here as well keeps hand-made slices right). A StatefulSet member
//! has to resolve its peers before any of them is ready, since the consensus cluster bootstraps
//! through these names, so its headless Service publishes not-ready addresses.
//!
//! Names under the cluster domain that do not exist get NXDOMAIN, and every negative answer
//! carries the zone's SOA (RFC 2308, so resolvers cache it for at most the TTL). Names outside
//! the domain are REFUSED: nothing is forwarded and nothing leaves the machine. Every TTL is
//! 5 s, so that a pod that moves is found again quickly.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

/// Time to live of every record, positive or negative.
pub const TTL: u32 = 5;

/// The label by which the EndpointSlice controller ties a slice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the answers are computed from: the reflectors' stores at the time of the question.
#[derive(Clone, Default)]
pub struct Snapshot {
    /// False until both stores have listed once: until then every name under the domain gets
    /// SERVFAIL (a resolver retries that) rather than an NXDOMAIN that it would cache.
    pub ready: bool,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
}

/// The zone served: the cluster domain and its SOA record.
pub struct Zone {
    origin: Name,
    soa: Record,
}

impl Zone {
    /// The zone of `domain` (`cluster.local`).
    pub fn new(domain: &str) -> anyhow::Result<Self> {
        let mut origin = Name::from_ascii(domain.trim_end_matches('.'))?.to_lowercase();
        origin.set_fqdn(true);
        anyhow::ensure!(!origin.is_root(), "the cluster domain must not be the root");
        let soa = SOA::new(
            Name::from_ascii("ns.dns")?.append_domain(&origin)?,
            Name::from_ascii("hostmaster")?.append_domain(&origin)?,
            1,
            7200,
            1800,
            86400,
            TTL,
        );
        let soa = Record::from_rdata(origin.clone(), TTL, RData::SOA(soa));
        Ok(Zone { origin, soa })
    }

    pub fn origin(&self) -> &Name {
        &self.origin
    }
}

/// The answer to one question, for `dns_server` to put into a message.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub code: ResponseCode,
    /// Set for every answer about a name under the domain (we are its only server).
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Answer {
    fn refused() -> Self {
        Answer {
            code: ResponseCode::Refused,
            authoritative: false,
            answers: vec![],
            authorities: vec![],
            additionals: vec![],
        }
    }
}

/// What a name under the domain is, before the question's type is looked at.
enum Found {
    /// No such name: NXDOMAIN.
    Nothing,
    /// The name exists but has no records of its own (`svc.<domain>`, a namespace): NODATA.
    Empty,
    /// Addresses (A).
    Addresses(Vec<Ipv4Addr>),
    /// SRV records with the A records of their targets.
    Services(Vec<(SRV, Vec<Ipv4Addr>)>),
    /// An alias (ExternalName Service).
    Alias(Name),
    /// The zone's apex: SOA.
    Apex,
}

/// Answers `query` from `snapshot`.
pub fn answer(zone: &Zone, snapshot: &Snapshot, query: &Query) -> Answer {
    let name = query.name();
    if query.query_class() != DNSClass::IN || !zone.origin.zone_of(name) {
        return Answer::refused();
    }
    if !snapshot.ready {
        return Answer {
            code: ResponseCode::ServFail,
            authoritative: false,
            answers: vec![],
            authorities: vec![],
            additionals: vec![],
        };
    }
    // The labels below the domain, lower-cased, the leftmost first.
    // Counted with iter(), not num_labels(), which leaves out a leading `*`.
    let below = name.iter().count() - zone.origin.iter().count();
    let labels: Vec<String> =
        name.iter().take(below).map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let found = lookup(zone, snapshot, &labels);
    let owner = name.clone();
    let record = |rdata: RData| Record::from_rdata(owner.clone(), TTL, rdata);
    let qtype = query.query_type();
    let mut answer = Answer {
        code: ResponseCode::NoError,
        authoritative: true,
        answers: vec![],
        authorities: vec![],
        additionals: vec![],
    };
    match found {
        Found::Nothing => answer.code = ResponseCode::NXDomain,
        Found::Empty => {}
        Found::Apex => {
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                answer.answers.push(zone.soa.clone());
            }
        }
        Found::Addresses(addresses) => {
            if matches!(qtype, RecordType::A | RecordType::ANY) {
                answer.answers.extend(addresses.into_iter().map(|ip| record(RData::A(A(ip)))));
            }
        }
        Found::Services(services) => {
            if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                for (srv, addresses) in services {
                    let target = srv.target.clone();
                    answer.answers.push(record(RData::SRV(srv)));
                    answer.additionals.extend(
                        addresses
                            .into_iter()
                            .map(|ip| Record::from_rdata(target.clone(), TTL, RData::A(A(ip)))),
                    );
                }
            }
        }
        Found::Alias(target) => {
            // A CNAME answers every type: the resolver follows it (and is refused beyond).
            answer.answers.push(record(RData::CNAME(CNAME(target))));
        }
    }
    if answer.answers.is_empty() {
        answer.additionals.clear();
        answer.authorities.push(zone.soa.clone());
    }
    answer
}

/// What the labels below the domain name.
fn lookup(zone: &Zone, snapshot: &Snapshot, labels: &[&str]) -> Found {
    match labels {
        [] => Found::Apex,
        ["svc"] | ["pod"] => Found::Empty,
        [ns, "svc"] => {
            if snapshot.services.iter().any(|s| s.metadata.namespace.as_deref() == Some(*ns)) {
                Found::Empty
            } else {
                Found::Nothing
            }
        }
        [svc, ns, "svc"] => match find_service(snapshot, ns, svc) {
            None => Found::Nothing,
            Some(service) => match external_name(service) {
                Some(target) => Found::Alias(target),
                None => Found::Addresses(
                    members(snapshot, service)
                        .map(|m| m.address)
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .collect(),
                ),
            },
        },
        [member, svc, ns, "svc"] => match find_service(snapshot, ns, svc) {
            None => Found::Nothing,
            // `_tcp.<svc>...` exists as the parent of the SRV names.
            Some(_) if ["_tcp", "_udp", "_sctp"].contains(member) => Found::Empty,
            Some(service) => {
                let addresses: BTreeSet<Ipv4Addr> =
                    members(snapshot, service).filter(|m| m.label() == *member).map(|m| m.address).collect();
                if addresses.is_empty() {
                    Found::Nothing
                } else {
                    Found::Addresses(addresses.into_iter().collect())
                }
            }
        },
        [port, proto, svc, ns, "svc"] => {
            let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_')) else {
                return Found::Nothing;
            };
            let Some(service) = find_service(snapshot, ns, svc) else { return Found::Nothing };
            let records = srv_records(zone, snapshot, service, port, proto);
            if records.is_empty() { Found::Nothing } else { Found::Services(records) }
        }
        [_ns, "pod"] => Found::Empty,
        [dashed, _ns, "pod"] => match parse_dashed(dashed) {
            Some(ip) => Found::Addresses(vec![ip]),
            None => Found::Nothing,
        },
        _ => Found::Nothing,
    }
}

fn find_service<'a>(snapshot: &'a Snapshot, ns: &str, name: &str) -> Option<&'a Service> {
    snapshot
        .services
        .iter()
        .find(|s| s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name))
        .map(Arc::as_ref)
}

fn external_name(service: &Service) -> Option<Name> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() != Some("ExternalName") {
        return None;
    }
    let mut name = Name::from_ascii(spec.external_name.as_deref()?.trim_end_matches('.')).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// One address of a Service that DNS publishes.
struct Member<'a> {
    address: Ipv4Addr,
    hostname: Option<&'a str>,
}

impl Member<'_> {
    /// The label naming this endpoint under its Service: its hostname, or its address with
    /// dashes for one without.
    fn label(&self) -> String {
        match self.hostname {
            Some(hostname) => hostname.to_ascii_lowercase(),
            None => self.address.to_string().replace('.', "-"),
        }
    }
}

/// The EndpointSlices of `service` (same namespace, the service-name label).
fn slices<'a>(snapshot: &'a Snapshot, service: &'a Service) -> impl Iterator<Item = &'a EndpointSlice> + 'a {
    snapshot.endpoint_slices.iter().map(Arc::as_ref).filter(move |slice| {
        slice.metadata.namespace == service.metadata.namespace
            && slice.metadata.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL))
                == service.metadata.name.as_ref()
            && slice.address_type == "IPv4"
    })
}

fn publishes_not_ready(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.publish_not_ready_addresses).unwrap_or(false)
}

/// Whether DNS publishes `endpoint`: ready ones always (an unset `ready` means ready, as the
/// API documents), the others when the Service publishes not-ready addresses.
fn published(endpoint: &Endpoint, publish_not_ready: bool) -> bool {
    publish_not_ready || endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true)
}

fn endpoint_members<'a>(endpoint: &'a Endpoint) -> impl Iterator<Item = Member<'a>> + 'a {
    endpoint
        .addresses
        .iter()
        .filter_map(|a| a.parse().ok())
        .map(|address| Member { address, hostname: endpoint.hostname.as_deref() })
}

/// The published addresses of `service`, over all its slices.
fn members<'a>(snapshot: &'a Snapshot, service: &'a Service) -> impl Iterator<Item = Member<'a>> + 'a {
    let publish_not_ready = publishes_not_ready(service);
    slices(snapshot, service)
        .flat_map(|slice| slice.endpoints.iter())
        .filter(move |e| published(e, publish_not_ready))
        .flat_map(endpoint_members)
}

/// SRV records for the port named `port` with protocol `proto` (lower case) of `service`.
fn srv_records(
    zone: &Zone,
    snapshot: &Snapshot,
    service: &Service,
    port: &str,
    proto: &str,
) -> Vec<(SRV, Vec<Ipv4Addr>)> {
    let publish_not_ready = publishes_not_ready(service);
    let (Some(svc), Some(ns)) = (service.metadata.name.as_deref(), service.metadata.namespace.as_deref())
    else {
        return vec![];
    };
    let mut found: Vec<(u16, String, Ipv4Addr)> = vec![];
    for slice in slices(snapshot, service) {
        let ports = slice.ports.iter().flatten().filter(|p| {
            p.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(port))
                && p.protocol.as_deref().unwrap_or("TCP").eq_ignore_ascii_case(proto)
        });
        for number in ports.filter_map(|p| p.port.and_then(|n| u16::try_from(n).ok())) {
            for member in
                slice.endpoints.iter().filter(|e| published(e, publish_not_ready)).flat_map(endpoint_members)
            {
                found.push((number, member.label(), member.address));
            }
        }
    }
    found.sort();
    found.dedup();
    // Equal weights summing to about 100, as CoreDNS gives them.
    let weight = u16::try_from((100 / found.len().max(1)).max(1)).unwrap_or(1);
    found
        .into_iter()
        .filter_map(|(number, label, address)| {
            let target =
                Name::from_ascii(format!("{label}.{svc}.{ns}.svc")).ok()?.append_domain(&zone.origin).ok()?;
            Some((SRV::new(0, weight, number, target), vec![address]))
        })
        .collect()
}

/// `10-244-1-5` as 10.244.1.5.
fn parse_dashed(label: &str) -> Option<Ipv4Addr> {
    let parts: Vec<&str> = label.split('-').collect();
    if parts.len() != 4 {
        return None;
    }
    parts.join(".").parse().ok()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ServiceSpec;
    use k8s_openapi::api::discovery::v1::{EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    /// A Service; `cluster_ip` None means headless.
    pub(crate) fn service(
        ns: &str,
        name: &str,
        cluster_ip: Option<&str>,
        publish_not_ready: bool,
    ) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.unwrap_or("None").into()),
                publish_not_ready_addresses: Some(publish_not_ready),
                type_: Some("ClusterIP".into()),
                ..Default::default()
            }),
            status: None,
        })
    }

    /// One EndpointSlice of `svc` with endpoints (address, hostname, ready) and a TCP port
    /// named `peer` 2380.
    pub(crate) fn slice(ns: &str, svc: &str, endpoints: &[(&str, Option<&str>, bool)]) -> Arc<EndpointSlice> {
        Arc::new(EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(format!("{svc}-abcde")),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints
                .iter()
                .map(|(address, hostname, ready)| Endpoint {
                    addresses: vec![address.to_string()],
                    hostname: hostname.map(str::to_string),
                    conditions: Some(EndpointConditions { ready: Some(*ready), ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("peer".into()),
                port: Some(2380),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        })
    }

    /// The fixed cluster of these tests: a headless Service `peers` publishing not-ready
    /// members, a headless `strict` that does not, a ClusterIP `api` and an ExternalName.
    pub(crate) fn fixture() -> Snapshot {
        let mut external = (*service("ns1", "outside", None, false)).clone();
        let spec = external.spec.as_mut().unwrap();
        spec.type_ = Some("ExternalName".into());
        spec.cluster_ip = None;
        spec.external_name = Some("example.org".into());
        Snapshot {
            ready: true,
            services: vec![
                service("ns1", "peers", None, true),
                service("ns1", "strict", None, false),
                service("ns1", "api", Some("10.96.0.20"), false),
                Arc::new(external),
            ],
            endpoint_slices: vec![
                slice(
                    "ns1",
                    "peers",
                    &[("10.244.1.2", Some("db-0"), true), ("10.244.2.3", Some("db-1"), false)],
                ),
                slice(
                    "ns1",
                    "strict",
                    &[("10.244.1.4", Some("web-0"), true), ("10.244.2.5", Some("web-1"), false)],
                ),
                slice("ns1", "api", &[("10.244.1.6", None, true), ("10.244.3.7", None, false)]),
                // Same Service name in another namespace: must not leak into ns1's answers.
                slice("ns2", "peers", &[("10.244.3.9", Some("db-0"), true)]),
            ],
        }
    }

    fn ask(name: &str, qtype: RecordType) -> Answer {
        let zone = Zone::new("cluster.local").unwrap();
        answer(&zone, &fixture(), &Query::query(Name::from_ascii(name).unwrap(), qtype))
    }

    fn addresses(answer: &Answer) -> Vec<String> {
        let mut found: Vec<String> = answer
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::A(a) => a.0.to_string(),
                other => panic!("not an A record: {other:?}"),
            })
            .collect();
        found.sort();
        found
    }

    #[test]
    fn headless_service_with_publish_not_ready_lists_every_member() {
        let answer = ask("peers.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(answer.code, ResponseCode::NoError);
        assert!(answer.authoritative);
        assert_eq!(addresses(&answer), ["10.244.1.2", "10.244.2.3"]);
        assert!(answer.answers.iter().all(|r| r.ttl == TTL));
    }

    #[test]
    fn headless_service_without_publish_not_ready_lists_ready_members_only() {
        let answer = ask("strict.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(addresses(&answer), ["10.244.1.4"]);
    }

    #[test]
    fn member_hostname_resolves_ready_or_not_per_publish_not_ready() {
        assert_eq!(addresses(&ask("db-1.peers.ns1.svc.cluster.local.", RecordType::A)), ["10.244.2.3"]);
        // Case does not matter in DNS.
        assert_eq!(addresses(&ask("DB-0.Peers.NS1.svc.cluster.local.", RecordType::A)), ["10.244.1.2"]);
        assert_eq!(addresses(&ask("web-0.strict.ns1.svc.cluster.local.", RecordType::A)), ["10.244.1.4"]);
        let not_ready = ask("web-1.strict.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(not_ready.code, ResponseCode::NXDomain);
        assert_eq!(not_ready.authorities.len(), 1, "SOA in the authority section");
        assert_eq!(ask("db-2.peers.ns1.svc.cluster.local.", RecordType::A).code, ResponseCode::NXDomain);
    }

    #[test]
    fn cluster_ip_service_answers_with_ready_endpoints_not_its_cluster_ip() {
        let answer = ask("api.ns1.svc.cluster.local.", RecordType::A);
        assert_eq!(addresses(&answer), ["10.244.1.6"]);
        // Endpoints without a hostname are named by their dashed address.
        assert_eq!(addresses(&ask("10-244-1-6.api.ns1.svc.cluster.local.", RecordType::A)), ["10.244.1.6"]);
    }

    #[test]
    fn unknown_names_under_the_domain_are_nxdomain_with_soa() {
        for name in [
            "missing.ns1.svc.cluster.local.",
            "peers.ns3.svc.cluster.local.",
            "ns3.svc.cluster.local.",
            "peers.ns1.svc.cluster.local.ns1.svc.cluster.local.",
            "whatever.cluster.local.",
        ] {
            let answer = ask(name, RecordType::A);
            assert_eq!(answer.code, ResponseCode::NXDomain, "{name}");
            assert!(answer.authoritative);
            assert!(answer.answers.is_empty());
            assert!(matches!(answer.authorities[0].data, RData::SOA(_)), "{name}");
        }
    }

    #[test]
    fn names_outside_the_domain_are_refused() {
        for name in ["example.org.", "cluster.local.example.org.", "local."] {
            let answer = ask(name, RecordType::A);
            assert_eq!(answer.code, ResponseCode::Refused, "{name}");
            assert!(answer.answers.is_empty() && answer.authorities.is_empty());
        }
    }

    #[test]
    fn aaaa_of_a_known_name_is_empty_noerror() {
        let answer = ask("peers.ns1.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(answer.code, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
        assert!(matches!(answer.authorities[0].data, RData::SOA(_)));
    }

    #[test]
    fn existing_parents_are_nodata() {
        for name in ["svc.cluster.local.", "ns1.svc.cluster.local.", "_tcp.peers.ns1.svc.cluster.local."] {
            let answer = ask(name, RecordType::A);
            assert_eq!(answer.code, ResponseCode::NoError, "{name}");
            assert!(answer.answers.is_empty(), "{name}");
        }
        let apex = ask("cluster.local.", RecordType::SOA);
        assert!(matches!(apex.answers[0].data, RData::SOA(_)));
    }

    #[test]
    fn srv_names_each_member_with_its_port() {
        let answer = ask("_peer._tcp.peers.ns1.svc.cluster.local.", RecordType::SRV);
        let mut targets: Vec<(String, u16)> = answer
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(srv) => (srv.target.to_ascii(), srv.port),
                other => panic!("not SRV: {other:?}"),
            })
            .collect();
        targets.sort();
        assert_eq!(
            targets,
            [
                ("db-0.peers.ns1.svc.cluster.local.".to_string(), 2380),
                ("db-1.peers.ns1.svc.cluster.local.".to_string(), 2380)
            ]
        );
        assert_eq!(answer.additionals.len(), 2, "the targets' A records");
        assert_eq!(
            ask("_client._tcp.peers.ns1.svc.cluster.local.", RecordType::SRV).code,
            ResponseCode::NXDomain
        );
        assert_eq!(
            ask("_peer._udp.peers.ns1.svc.cluster.local.", RecordType::SRV).code,
            ResponseCode::NXDomain
        );
    }

    #[test]
    fn pod_names_spell_their_address() {
        assert_eq!(addresses(&ask("10-244-2-9.ns1.pod.cluster.local.", RecordType::A)), ["10.244.2.9"]);
        assert_eq!(ask("10-244-2.ns1.pod.cluster.local.", RecordType::A).code, ResponseCode::NXDomain);
    }

    #[test]
    fn external_name_is_an_alias() {
        let answer = ask("outside.ns1.svc.cluster.local.", RecordType::A);
        assert!(matches!(&answer.answers[0].data, RData::CNAME(c) if c.0.to_ascii() == "example.org."));
    }

    #[test]
    fn before_the_stores_have_listed_answers_are_servfail() {
        let zone = Zone::new("cluster.local").unwrap();
        let query = Query::query(Name::from_ascii("peers.ns1.svc.cluster.local.").unwrap(), RecordType::A);
        let answer = answer(&zone, &Snapshot { ready: false, ..fixture() }, &query);
        assert_eq!(answer.code, ResponseCode::ServFail);
    }
}

//! The cluster DNS server's wire and sockets: UDP and TCP (RFC 1035 length-prefixed) on one
//! address, each message decoded with hickory-proto and answered by `dns::answer`.
//!
//! Whatever arrives, nothing here panics: a packet that does not decode, or carries other
//! than exactly one question, gets FORMERR; another opcode NOTIMP; a response (QR set) is
//! dropped, so that two servers can never answer each other in a loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

use super::dns::{self, Snapshot, Zone};

/// The largest UDP answer we send when the client does not say (RFC 1035), and the most we
/// offer with EDNS (the DNS flag day 2020 value, safe from fragmentation).
const PLAIN_UDP_LIMIT: usize = 512;
const EDNS_UDP_LIMIT: u16 = 1232;
/// A TCP client that says nothing for this long is disconnected.
const TCP_IDLE: Duration = Duration::from_secs(30);

/// Where the answers come from: a fresh snapshot for every question.
pub type SnapshotSource = Arc<dyn Fn() -> Snapshot + Send + Sync>;

/// Over which transport a message came, which bounds the answer's size.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The reply to one received message, or None when nothing should be sent back.
pub fn handle_packet(
    zone: &Zone,
    snapshot: &Snapshot,
    packet: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    // Byte 2's high bit is QR: never answer a response. Shorter than that, there is no
    // header to answer to.
    if packet.len() < 3 || packet[2] & 0x80 != 0 {
        return None;
    }
    let request = match Message::from_vec(packet) {
        Ok(request) => request,
        Err(error) => {
            tracing::debug!(%error, "malformed DNS message");
            let id = u16::from_be_bytes([packet[0], packet[1]]);
            return encode(&Message::error_msg(id, OpCode::Query, ResponseCode::FormErr));
        }
    };
    let mut response = Message::new(request.id, MessageType::Response, request.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_LIMIT);
        response.edns = Some(edns);
    }
    if request.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return encode(&response);
    }
    let [query] = request.queries.as_slice() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return encode(&response);
    };
    let answer = dns::answer(zone, snapshot, query);
    tracing::debug!(name = %query.name(), qtype = %query.query_type(), code = ?answer.code, answers = answer.answers.len(), "DNS");
    response.add_query(query.clone());
    response.metadata.response_code = answer.code;
    response.metadata.authoritative = answer.authoritative;
    response.answers = answer.answers;
    response.authorities = answer.authorities;
    response.additionals = answer.additionals;
    let encoded = encode(&response)?;
    let limit = match (transport, &request.edns) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => PLAIN_UDP_LIMIT,
        (Transport::Udp, Some(edns)) => usize::from(edns.max_payload().clamp(512, EDNS_UDP_LIMIT)),
    };
    if encoded.len() <= limit {
        return Some(encoded);
    }
    // Too large for the datagram: say so with TC and no records; the client asks over TCP.
    response.metadata.truncation = true;
    response.answers.clear();
    response.authorities.clear();
    response.additionals.clear();
    encode(&response)
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            tracing::warn!(%error, "could not encode a DNS answer");
            None
        }
    }
}

/// The bound sockets of the server, UDP and TCP on the same address.
pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsServer {
    /// Binds `listen`; with port 0 a free port is found that both UDP and TCP can have.
    pub async fn bind(listen: SocketAddr) -> anyhow::Result<Self> {
        for _ in 0..20 {
            let udp = UdpSocket::bind(listen).await.with_context(|| format!("binding UDP {listen}"))?;
            let bound = udp.local_addr()?;
            match TcpListener::bind(bound).await {
                Ok(tcp) => return Ok(DnsServer { udp, tcp }),
                // The UDP port chosen for us is taken for TCP: try another.
                Err(_) if listen.port() == 0 => continue,
                Err(error) => return Err(error).with_context(|| format!("binding TCP {listen}")),
            }
        }
        anyhow::bail!("no port free for both UDP and TCP on {}", listen.ip())
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.udp.local_addr()?)
    }

    /// Serves until the future is dropped.
    pub async fn serve(self, zone: Arc<Zone>, source: SnapshotSource) -> anyhow::Result<()> {
        tracing::info!(listen = %self.local_addr()?, zone = %zone.origin(), "cluster DNS serving on UDP and TCP");
        tokio::try_join!(
            serve_udp(self.udp, zone.clone(), source.clone()),
            serve_tcp(self.tcp, zone, source)
        )?;
        Ok(())
    }
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Zone>, source: SnapshotSource) -> anyhow::Result<()> {
    let mut buffer = vec![0u8; 65535];
    loop {
        let (length, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            // ICMP port-unreachable from an earlier reply shows up here on Linux: not fatal.
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => continue,
            // Anything else (out of buffers and the like) passes too: DNS must not stop for
            // the whole cluster over one datagram. The pause keeps a lasting error from spinning.
            Err(error) => {
                tracing::warn!(%error, "receiving DNS over UDP");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if let Some(reply) = handle_packet(&zone, &source(), &buffer[..length], Transport::Udp)
            && let Err(error) = socket.send_to(&reply, peer).await
        {
            tracing::debug!(%peer, %error, "could not send a DNS answer");
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Zone>, source: SnapshotSource) -> anyhow::Result<()> {
    // Connections end with the server: the set aborts them when dropped.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of descriptors and the like: wait a little rather than spin.
                        tracing::warn!(%error, "accepting a DNS connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (zone, source) = (zone.clone(), source.clone());
                connections.spawn(async move {
                    if let Err(error) = serve_connection(stream, &zone, &source).await {
                        tracing::debug!(%peer, %error, "DNS connection ended");
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(mut stream: TcpStream, zone: &Zone, source: &SnapshotSource) -> anyhow::Result<()> {
    loop {
        let mut length = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut length)).await {
            Err(_) => return Ok(()),
            Ok(Err(error)) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(result) => result?,
        };
        let mut packet = vec![0u8; usize::from(u16::from_be_bytes(length))];
        tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut packet)).await??;
        let Some(reply) = handle_packet(zone, &source(), &packet, Transport::Tcp) else { return Ok(()) };
        let reply_length = u16::try_from(reply.len())?.to_be_bytes();
        stream.write_all(&[&reply_length[..], &reply].concat()).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster_services::dns::tests::fixture;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RData, RecordType};

    fn query(name: &str, qtype: RecordType) -> Message {
        let mut message = Message::query();
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        message
    }

    fn ask(packet: &[u8]) -> Option<Message> {
        let zone = Zone::new("cluster.local").unwrap();
        handle_packet(&zone, &fixture(), packet, Transport::Udp)
            .map(|reply| Message::from_vec(&reply).unwrap())
    }

    #[test]
    fn malformed_packets_get_formerr_with_their_id() {
        let reply = ask(&[0x12, 0x34, 0x01, 0x00, 0xff]).expect("a reply");
        assert_eq!(reply.id, 0x1234);
        assert_eq!(reply.response_code, ResponseCode::FormErr);
        assert!(ask(&[0x12]).is_none(), "no header: nothing to answer");
    }

    #[test]
    fn several_questions_get_formerr() {
        let mut message = query("peers.ns1.svc.cluster.local.", RecordType::A);
        message
            .add_query(Query::query(Name::from_ascii("api.ns1.svc.cluster.local.").unwrap(), RecordType::A));
        let reply = ask(&message.to_vec().unwrap()).unwrap();
        assert_eq!(reply.response_code, ResponseCode::FormErr);
        let none = Message::query();
        assert_eq!(ask(&none.to_vec().unwrap()).unwrap().response_code, ResponseCode::FormErr);
    }

    #[test]
    fn responses_are_never_answered() {
        let mut message = query("peers.ns1.svc.cluster.local.", RecordType::A);
        message.metadata.message_type = MessageType::Response;
        assert!(ask(&message.to_vec().unwrap()).is_none());
    }

    #[test]
    fn other_opcodes_are_not_implemented() {
        let mut message = query("peers.ns1.svc.cluster.local.", RecordType::A);
        message.metadata.op_code = OpCode::Update;
        assert_eq!(ask(&message.to_vec().unwrap()).unwrap().response_code, ResponseCode::NotImp);
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated() {
        let mut snapshot = fixture();
        let members: Vec<(String, String)> =
            (0..60).map(|i| (format!("10.244.5.{}", i + 2), format!("m-{i}"))).collect();
        let endpoints: Vec<(&str, Option<&str>, bool)> =
            members.iter().map(|(a, h)| (a.as_str(), Some(h.as_str()), true)).collect();
        snapshot.services.push(crate::cluster_services::dns::tests::service("big", "many", None, false));
        snapshot.endpoint_slices.push(crate::cluster_services::dns::tests::slice("big", "many", &endpoints));
        let zone = Zone::new("cluster.local").unwrap();
        let packet = query("many.big.svc.cluster.local.", RecordType::A).to_vec().unwrap();
        let udp =
            Message::from_vec(&handle_packet(&zone, &snapshot, &packet, Transport::Udp).unwrap()).unwrap();
        assert!(udp.truncation && udp.answers.is_empty());
        let tcp =
            Message::from_vec(&handle_packet(&zone, &snapshot, &packet, Transport::Tcp).unwrap()).unwrap();
        assert!(!tcp.truncation);
        assert_eq!(tcp.answers.len(), 60);
    }

    /// The server on a free loopback port, answering from the fixed snapshot, asked over real
    /// UDP and TCP sockets.
    #[tokio::test]
    async fn answers_real_queries_over_udp_and_tcp() {
        let server = DnsServer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let address = server.local_addr().unwrap();
        let zone = Arc::new(Zone::new("cluster.local").unwrap());
        let snapshot = fixture();
        let serving = tokio::spawn(server.serve(zone, Arc::new(move || snapshot.clone())));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let request = query("db-1.peers.ns1.svc.cluster.local.", RecordType::A);
        client.send_to(&request.to_vec().unwrap(), address).await.unwrap();
        let mut buffer = vec![0u8; 4096];
        let (length, _) = tokio::time::timeout(Duration::from_secs(5), client.recv_from(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        let reply = Message::from_vec(&buffer[..length]).unwrap();
        assert_eq!(reply.id, request.id);
        assert_eq!(reply.response_code, ResponseCode::NoError);
        assert!(reply.authoritative);
        assert!(matches!(&reply.answers[0].data, RData::A(a) if a.0.to_string() == "10.244.2.3"));

        // Outside the domain, over TCP.
        let mut stream = TcpStream::connect(address).await.unwrap();
        let request = query("example.org.", RecordType::A).to_vec().unwrap();
        let length = u16::try_from(request.len()).unwrap().to_be_bytes();
        stream.write_all(&[&length[..], &request].concat()).await.unwrap();
        let mut length = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut length)).await.unwrap().unwrap();
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(Message::from_vec(&reply).unwrap().response_code, ResponseCode::Refused);

        serving.abort();
    }
}

//! Writes the seed inputs of each fuzz target into `corpus/<target>/seed-*`: valid examples
//! made by the member's own code (a WAL it wrote, requests it applies, a snapshot it took,
//! a grpc-go style HTTP/2 stream), for the fuzzer to mutate from. `make fuzz-seeds`.

use std::path::Path;
use std::sync::mpsc;

use consensus_node::kv::{MvccStore, apply_command};
use consensus_node::proto::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use consensus_node::proto::etcdserverpb::request_op::Request;
use consensus_node::proto::etcdserverpb::{
    AlarmRequest, CompactionRequest, Compare, DeleteRangeRequest, LeaseGrantRequest, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest,
};
use consensus_node::raft::state_machine::snapshot_of_store;
use consensus_node::storage::wal::{Wal, WalOptions};
use consensus_node_fuzz::{apply, push_chunk, scratch_dir};
use prost::Message;

fn write(target: &str, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)?;
    Ok(())
}

/// The segment files of `dir` as the `wal` target reads them.
fn wal_input(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)?.map(|e| e.map(|e| e.path())).collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "wal"));
    files.sort();
    let files = &files[files.len().saturating_sub(4)..];
    let mut input = vec![u8::try_from(files.len() - 1)?];
    for path in files {
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
        input.extend_from_slice(&u16::try_from(u64::from_str_radix(stem, 16)?)?.to_le_bytes());
        push_chunk(&mut input, &std::fs::read(path)?);
    }
    Ok(input)
}

fn wal_seeds() -> anyhow::Result<()> {
    let dir = scratch_dir();
    let wal = Wal::open(dir.path(), WalOptions { segment_bytes: 512, ..WalOptions::default() })?;
    let entry = |i: u64| (i, format!("entry {i}").into_bytes());
    wal.append_blocking((1..=20).map(entry).collect())?;
    let (tx, rx) = mpsc::channel();
    wal.truncate_from(18, Box::new(move |r| drop(tx.send(r))));
    rx.recv()??;
    wal.append_blocking((18..=24).map(entry).collect())?;
    wal.purge_to(6)?;
    drop(wal);
    let input = wal_input(dir.path())?;
    write("wal", "seed-segments", &input)?;
    // The same with the last record torn off halfway, as a crash mid-write leaves it.
    write("wal", "seed-torn-tail", &input[..input.len() - 7])?;
    Ok(())
}

fn apply_requests() -> Vec<(u8, Vec<u8>)> {
    let put = |key: &str, value: &str, lease: i64| PutRequest {
        key: key.into(),
        value: value.into(),
        lease,
        prev_kv: true,
        ..Default::default()
    };
    let txn = TxnRequest {
        compare: vec![Compare {
            key: "a".into(),
            target: CompareTarget::Value as i32,
            result: CompareResult::Equal as i32,
            target_union: Some(TargetUnion::Value("1".into())),
            ..Default::default()
        }],
        success: vec![
            RequestOp { request: Some(Request::RequestPut(put("c", "3", 0))) },
            RequestOp {
                request: Some(Request::RequestRange(RangeRequest { key: "a".into(), ..Default::default() })),
            },
        ],
        failure: vec![RequestOp {
            request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                key: "b".into(),
                ..Default::default()
            })),
        }],
    };
    let nospace = |action: i32| AlarmRequest { action, member_id: 1, alarm: 1 }.encode_to_vec();
    vec![
        (4, LeaseGrantRequest { ttl: 10, id: 7 }.encode_to_vec()),
        (0, put("a", "1", 7).encode_to_vec()),
        (0, put("b", "2", 0).encode_to_vec()),
        (2, txn.encode_to_vec()),
        (1, DeleteRangeRequest { key: "a".into(), range_end: "z".into(), prev_kv: true }.encode_to_vec()),
        (3, CompactionRequest { revision: 3, physical: false }.encode_to_vec()),
        (6, nospace(1)),
        (0, put("d", "4", 0).encode_to_vec()),
        (6, nospace(2)),
        (5, LeaseRevokeRequest { id: 7 }.encode_to_vec()),
    ]
}

fn apply_and_snapshot_seeds() -> anyhow::Result<()> {
    let requests = apply_requests();
    let mut input = Vec::new();
    for (kind, request) in &requests {
        input.push(*kind);
        push_chunk(&mut input, request);
    }
    write("apply", "seed-requests", &input)?;

    let dir = scratch_dir();
    let store = MvccStore::open(&dir.path().join("store.db"))?;
    for (kind, request) in requests {
        let mut applying = store.applying(false)?;
        apply_command(&mut applying, &apply::command(kind, request))?;
        applying.finish()?;
    }
    let mut file = snapshot_of_store(&store, dir.path())?.file;
    let mut snapshot = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut snapshot)?;
    // The target appends the checksum itself.
    snapshot.truncate(snapshot.len() - 32);
    write("snapshot", "seed-snapshot", &snapshot)?;
    Ok(())
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn authority_seeds() -> anyhow::Result<()> {
    let mut encoder = loona_hpack::Encoder::new();
    let headers: [(&[u8], &[u8]); 5] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/etcdserverpb.KV/Range"),
        (b":authority", b"http://127.0.0.1:2379"),
        (b"content-type", b"application/grpc"),
    ];
    let block = encoder.encode(headers);
    let mut stream = 10u16.to_le_bytes().to_vec();
    stream.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    stream.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    stream.extend(frame(0x1, 0x4, 1, &block));
    stream.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 2, 10, 1]));
    // The next request's block refers to the first one's entries in HPACK's dynamic table.
    stream.extend(frame(0x1, 0, 3, &encoder.encode(headers)[..3]));
    stream.extend(frame(0x9, 0x4, 3, &encoder.encode(headers)[3..]));
    write("authority", "seed-two-requests", &stream)?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    wal_seeds()?;
    apply_and_snapshot_seeds()?;
    authority_seeds()
}

//! Accepts the HTTP/2 `:authority` etcd's Go clients send when they dial a URL directly.
//!
//! etcdctl 3.4 dials `http://host:port` endpoints (`endpoint status --cluster`, `endpoint
//! health`, `move-leader` with advertised URLs) as gRPC target `passthrough:///http://host:port`,
//! and grpc-go then sends `:authority: http://host:port`. Go's HTTP/2 server takes it; the
//! Rust one (h2) rejects the stream as malformed. This wraps the client-port connection and
//! rewrites such an authority to `host:port` before h2 reads it.
//!
//! Rewriting one header block changes HPACK's shared compression state, so once one is
//! rewritten every later header block from the client is decoded and re-encoded too (with our
//! own encoder, whose state the server's decoder then mirrors). grpc-go sends one authority,
//! its channel's, on every stream of a connection: the first header block decides. A
//! connection whose first block needs no rewriting passes through untouched from there on, and
//! costs nothing more; decoding every block cost a quarter of a leader's instructions per put.
//! Frames other than header blocks, and everything the server writes, always pass through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use loona_hpack::{Decoder, Encoder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub const PREFACE_LEN: usize = 24;
pub const FRAME_HEADER: usize = 9;
pub const HEADERS: u8 = 0x1;
pub const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
pub const PRIORITY: u8 = 0x20;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may have; re-encoded blocks are split to fit.
/// It is also the largest frame our server accepts (hyper's default, which `server.rs` keeps),
/// so a longer frame is refused before its payload is waited for.
pub const MAX_FRAME: usize = 16_384;
/// The largest header list our server accepts (hyper's SETTINGS_MAX_HEADER_LIST_SIZE default,
/// 16 KiB, counted as RFC 7541 does: name + value + 32 per field). A block decoding to more is
/// refused here as it would be there, before it is copied.
const MAX_HEADER_LIST: usize = 16 * 1024;
/// A compressed block is at most this long: Huffman coding can make a field up to 30 bits per
/// byte, so 4x the list limit is more than any block that decodes within it.
const MAX_HEADER_BLOCK: usize = 4 * MAX_HEADER_LIST;

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("HTTP/2 from client: {what}"))
}

/// A header block being collected across HEADERS and CONTINUATION frames.
struct PendingBlock {
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    block: Vec<u8>,
}

/// What the rewriter does with the client's header blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the first header block has ended.
    Undecided,
    /// Decodes and re-encodes every header block: the first one had its authority rewritten.
    Rewriting,
    /// Passes everything through, as it came: the first header block needed no rewriting.
    /// Holds how many bytes had been read and written before.
    PassingThrough { read: usize, written: usize },
}

/// The client-to-server byte stream, frame by frame.
pub struct FrameRewriter {
    preface_left: usize,
    pending: Option<PendingBlock>,
    decoder: Decoder<'static>,
    encoder: Encoder<'static>,
    mode: Mode,
    /// Bytes taken from the input and written to the output so far.
    read: usize,
    written: usize,
}

impl Default for FrameRewriter {
    fn default() -> Self {
        Self {
            preface_left: PREFACE_LEN,
            pending: None,
            decoder: Decoder::new(),
            encoder: Encoder::new(),
            mode: Mode::Undecided,
            read: 0,
            written: 0,
        }
    }
}

/// `http://host:port` (or `https://`, with or without a trailing slash) to `host:port`.
pub fn normalize_authority(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?;
    let (_, rest) = text.split_once("://")?;
    Some(rest.trim_end_matches('/').as_bytes().to_vec())
}

impl FrameRewriter {
    /// Once the first header block needed no rewriting: how many bytes had been read from
    /// the input and written to the output by then. Every byte after those passes unchanged.
    pub fn passing_through_after(&self) -> Option<(usize, usize)> {
        match self.mode {
            Mode::PassingThrough { read, written } => Some((read, written)),
            Mode::Undecided | Mode::Rewriting => None,
        }
    }

    /// Moves every complete unit (preface bytes, whole frames) from `input` to `output`,
    /// rewritten; leaves an incomplete frame in `input` for the next call.
    pub fn process(&mut self, input: &mut Vec<u8>, output: &mut Vec<u8>) -> io::Result<()> {
        if self.passing_through_after().is_some() {
            output.append(input);
            return Ok(());
        }
        let written = output.len();
        let mut at = 0;
        if self.preface_left > 0 {
            let n = self.preface_left.min(input.len());
            output.extend_from_slice(&input[..n]);
            self.preface_left -= n;
            at = n;
        }
        while self.preface_left == 0 && input.len() - at >= FRAME_HEADER {
            let header = &input[at..at + FRAME_HEADER];
            let len = (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
            if len > MAX_FRAME {
                return Err(malformed(&format!("a frame of {len} bytes, over the {MAX_FRAME} allowed")));
            }
            if input.len() - at < FRAME_HEADER + len {
                break;
            }
            let (kind, flags) = (header[3], header[4]);
            let stream_id = [header[5], header[6], header[7], header[8]];
            let payload = &input[at + FRAME_HEADER..at + FRAME_HEADER + len];
            let ended_block = match kind {
                HEADERS => self.headers(flags, stream_id, payload, output)?,
                CONTINUATION => {
                    let pending =
                        self.pending.as_mut().ok_or_else(|| malformed("CONTINUATION without HEADERS"))?;
                    if pending.block.len() + payload.len() > MAX_HEADER_BLOCK {
                        return Err(malformed("a header block over the header list limit"));
                    }
                    pending.block.extend_from_slice(payload);
                    flags & END_HEADERS != 0 && self.finish_block(output)?
                }
                _ => {
                    output.extend_from_slice(&input[at..at + FRAME_HEADER + len]);
                    false
                }
            };
            at += FRAME_HEADER + len;
            if ended_block && self.mode == Mode::Undecided {
                // The first header block was written as it came: so is everything after it.
                self.mode = Mode::PassingThrough {
                    read: self.read + at,
                    written: self.written + output.len() - written,
                };
                output.extend_from_slice(&input[at..]);
                at = input.len();
            }
        }
        self.read += at;
        self.written += output.len() - written;
        input.drain(..at);
        Ok(())
    }

    fn headers(
        &mut self,
        flags: u8,
        stream_id: [u8; 4],
        payload: &[u8],
        output: &mut Vec<u8>,
    ) -> io::Result<bool> {
        let mut body = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            pad = usize::from(*body.first().ok_or_else(|| malformed("empty padded HEADERS"))?);
            body = &body[1..];
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let fields: [u8; 5] =
                body.get(..5).and_then(|p| p.try_into().ok()).ok_or_else(|| malformed("short HEADERS"))?;
            priority = Some(fields);
            body = &body[5..];
        }
        let block =
            body.get(..body.len().checked_sub(pad).ok_or_else(|| malformed("padding"))?).unwrap_or_default();
        self.pending = Some(PendingBlock {
            stream_id,
            end_stream: flags & END_STREAM != 0,
            priority,
            block: block.to_vec(),
        });
        Ok(flags & END_HEADERS != 0 && self.finish_block(output)?)
    }

    /// Writes the header block collected; true once it is written.
    fn finish_block(&mut self, output: &mut Vec<u8>) -> io::Result<bool> {
        let Some(pending) = self.pending.take() else { return Ok(false) };
        let mut headers = Vec::new();
        let mut list_size = 0;
        self.decoder
            .decode_with_cb(&pending.block, |name, value| {
                // Fields past the limit are counted, not copied: a few bytes of indexed fields
                // can name a large table entry many times over.
                list_size += name.len() + value.len() + 32;
                if list_size <= MAX_HEADER_LIST {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| malformed(&format!("HPACK: {e:?}")))?;
        if list_size > MAX_HEADER_LIST {
            return Err(malformed(&format!(
                "a header list of {list_size} bytes, over the {MAX_HEADER_LIST} allowed"
            )));
        }
        let mut rewritten = false;
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && let Some(normalized) = normalize_authority(value)
            {
                *value = normalized;
                rewritten = true;
            }
        }
        if self.mode == Mode::Undecided && rewritten {
            self.mode = Mode::Rewriting;
        }
        let mut block = match self.mode {
            Mode::Rewriting => self.encoder.encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))),
            // The client's own encoding: the server's decoder follows the client's encoder.
            Mode::Undecided | Mode::PassingThrough { .. } => pending.block,
        };
        let mut first = Vec::new();
        if let Some(priority) = pending.priority {
            first.extend_from_slice(&priority);
        }
        let room = MAX_FRAME - first.len();
        let rest = block.split_off(block.len().min(room));
        first.extend_from_slice(&block);
        let mut flags = if pending.end_stream { END_STREAM } else { 0 };
        if pending.priority.is_some() {
            flags |= PRIORITY;
        }
        let chunks: Vec<&[u8]> = rest.chunks(MAX_FRAME).collect();
        if chunks.is_empty() {
            flags |= END_HEADERS;
        }
        write_frame(output, HEADERS, flags, pending.stream_id, &first);
        for (i, chunk) in chunks.iter().enumerate() {
            let last = if i + 1 == chunks.len() { END_HEADERS } else { 0 };
            write_frame(output, CONTINUATION, last, pending.stream_id, chunk);
        }
        Ok(true)
    }
}

fn write_frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: [u8; 4], payload: &[u8]) {
    let len = payload.len();
    out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
    out.extend_from_slice(&stream_id);
    out.extend_from_slice(payload);
}

/// A client connection whose inbound HTTP/2 goes through `FrameRewriter`.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: FrameRewriter,
    /// What each read from `inner` goes into: allocated once, not zeroed per read.
    chunk: Box<[u8]>,
    raw: Vec<u8>,
    ready: Vec<u8>,
    ready_at: usize,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: FrameRewriter::default(),
            chunk: vec![0; 16 * 1024].into_boxed_slice(),
            raw: Vec::new(),
            ready: Vec::new(),
            ready_at: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.ready_at < this.ready.len() {
                let n = buf.remaining().min(this.ready.len() - this.ready_at);
                buf.put_slice(&this.ready[this.ready_at..this.ready_at + n]);
                this.ready_at += n;
                if this.ready_at == this.ready.len() {
                    this.ready.clear();
                    this.ready_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.rewriter.passing_through_after().is_some() && this.raw.is_empty() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut read = ReadBuf::new(&mut this.chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.raw.extend_from_slice(read.filled());
                    this.rewriter.process(&mut this.raw, &mut this.ready)?;
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    /// h2 copies a DATA frame into its write buffer only below a threshold: 256 bytes for a
    /// vectored writer, 1 KiB for one that is not. A larger frame is held apart and flushed
    /// alone, one `writev` per frame, so a watch event of a 256-byte value reached each of
    /// the stream's watchers in a system call of its own. Frames up to 1 KiB (most events and
    /// small ranges) now share the buffer and go out together; a larger frame costs a second
    /// `write` for its payload, small beside its size.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

impl tonic::transport::server::Connected for AuthorityFix<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers_frame(
        encoder: &mut Encoder<'_>,
        stream: u8,
        headers: &[(&[u8], &[u8])],
        flags: u8,
    ) -> Vec<u8> {
        let block = encoder.encode(headers.iter().copied());
        let mut frame = Vec::new();
        write_frame(&mut frame, HEADERS, flags | END_HEADERS, [0, 0, 0, stream], &block);
        frame
    }

    /// Splits `bytes` back into frames and decodes each header block.
    fn decoded_blocks(bytes: &[u8]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut decoder = Decoder::new();
        let mut at = PREFACE_LEN;
        let mut blocks = Vec::new();
        while at < bytes.len() {
            let len = (usize::from(bytes[at]) << 16)
                | (usize::from(bytes[at + 1]) << 8)
                | usize::from(bytes[at + 2]);
            if bytes[at + 3] == HEADERS {
                blocks.push(
                    decoder.decode(&bytes[at + FRAME_HEADER..at + FRAME_HEADER + len]).expect("decodes"),
                );
            }
            at += FRAME_HEADER + len;
        }
        blocks
    }

    #[test]
    fn a_url_authority_becomes_host_and_port_and_other_frames_pass_through() {
        let mut client = Encoder::new();
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend(headers_frame(
            &mut client,
            1,
            &[
                (b":method", b"POST"),
                (b":authority", b"http://127.0.0.1:2379"),
                (b":path", b"/etcdserverpb.KV/Range"),
            ],
            0,
        ));
        let mut data = Vec::new();
        write_frame(&mut data, 0x0, END_STREAM, [0, 0, 0, 1], b"grpc-body");
        stream.extend(&data);
        // The same authority again: the client's encoder now sends it from its dynamic table.
        stream.extend(headers_frame(
            &mut client,
            3,
            &[(b":authority", b"http://127.0.0.1:2379")],
            END_STREAM,
        ));

        let mut rewriter = FrameRewriter::default();
        let mut output = Vec::new();
        // Byte by byte: frames split across reads are reassembled.
        let mut input = Vec::new();
        for byte in stream {
            input.push(byte);
            rewriter.process(&mut input, &mut output).expect("valid HTTP/2");
        }
        assert!(input.is_empty());
        assert!(output.starts_with(b"PRI * HTTP/2.0"));
        let windows = output.windows(data.len()).any(|w| w == data.as_slice());
        assert!(windows, "the DATA frame passes through unchanged");
        assert_eq!(rewriter.passing_through_after(), None);
        let blocks = decoded_blocks(&output);
        assert_eq!(blocks.len(), 2);
        for block in &blocks {
            let authority = block.iter().find(|(n, _)| n == b":authority").map(|(_, v)| v.clone());
            assert_eq!(authority.as_deref(), Some(b"127.0.0.1:2379".as_slice()));
        }
        assert_eq!(blocks[0][2], (b":path".to_vec(), b"/etcdserverpb.KV/Range".to_vec()));
    }

    /// The first header block decides: with no authority to rewrite, the connection's bytes
    /// pass through as they came, the server's decoder following the client's encoder.
    #[test]
    fn a_connection_whose_first_block_needs_no_rewriting_passes_through_unchanged() {
        let mut client = Encoder::new();
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let first = headers_frame(&mut client, 1, &[(b":authority", b"127.0.0.1:2379")], 0);
        stream.extend(&first);
        let before_second = stream.len();
        write_frame(&mut stream, 0x0, END_STREAM, [0, 0, 0, 1], b"grpc-body");
        stream.extend(headers_frame(&mut client, 3, &[(b":authority", b"127.0.0.1:2379")], END_STREAM));
        // Past the decision nothing is parsed: not even a frame the server will refuse.
        stream.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 5]);

        let mut rewriter = FrameRewriter::default();
        let (mut input, mut output) = (Vec::new(), Vec::new());
        for byte in &stream {
            input.push(*byte);
            rewriter.process(&mut input, &mut output).expect("passed through");
        }
        assert_eq!(output, stream);
        assert_eq!(rewriter.passing_through_after(), Some((before_second, before_second)));

        // Whole, the same.
        let mut rewriter = FrameRewriter::default();
        let (mut input, mut output) = (stream.clone(), Vec::new());
        rewriter.process(&mut input, &mut output).expect("passed through");
        assert_eq!(output, stream);
        assert!(input.is_empty());
    }

    fn process_all(frames: &[u8]) -> io::Result<Vec<u8>> {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend_from_slice(frames);
        let mut output = Vec::new();
        FrameRewriter::default().process(&mut input, &mut output)?;
        Ok(output)
    }

    #[test]
    fn a_header_block_continued_past_the_limit_is_refused_not_buffered() {
        let mut frames = Vec::new();
        write_frame(&mut frames, HEADERS, 0, [0, 0, 0, 1], &[0x82]);
        let filler = vec![0u8; MAX_FRAME];
        for _ in 0..=MAX_HEADER_BLOCK / MAX_FRAME {
            write_frame(&mut frames, CONTINUATION, 0, [0, 0, 0, 1], &filler);
        }
        let refused = process_all(&frames).expect_err("an endless header block is refused");
        assert!(refused.to_string().contains("header list limit"), "{refused}");
    }

    #[test]
    fn a_frame_longer_than_the_server_allows_is_refused_before_its_payload_arrives() {
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // The header of a 16 MiB DATA frame, and none of its payload.
        input.extend_from_slice(&[0xff, 0xff, 0xff, 0x0, 0x0, 0, 0, 0, 1]);
        let refused = FrameRewriter::default().process(&mut input, &mut Vec::new()).expect_err("refused");
        assert!(refused.to_string().contains("16777215 bytes"), "{refused}");
    }

    #[test]
    fn a_small_block_naming_a_large_entry_many_times_is_refused_uncopied() {
        // One 4000-byte value put in the dynamic table, then indexed 1000 times (1 byte each):
        // 4 MB of headers from a 5 KB block.
        let mut encoder = Encoder::new();
        let value = vec![b'v'; 4000];
        let mut block = encoder.encode([(b"x-big".as_slice(), value.as_slice())]);
        block.extend(std::iter::repeat_n(0x80 | 62, 1000));
        let mut frames = Vec::new();
        write_frame(&mut frames, HEADERS, END_HEADERS, [0, 0, 0, 1], &block);
        let refused = process_all(&frames).expect_err("refused");
        assert!(refused.to_string().contains("header list of"), "{refused}");
        // Within the limit, the same value once passes.
        let mut frames = Vec::new();
        write_frame(
            &mut frames,
            HEADERS,
            END_HEADERS,
            [0, 0, 0, 1],
            &Encoder::new().encode([(b"x-big".as_slice(), value.as_slice())]),
        );
        assert!(process_all(&frames).is_ok());
    }

    #[test]
    fn plain_authorities_are_left_alone() {
        assert_eq!(normalize_authority(b"127.0.0.1:2379"), None);
        assert_eq!(
            normalize_authority(b"https://etcd-0.etcd:2379/").as_deref(),
            Some(b"etcd-0.etcd:2379".as_slice())
        );
    }
}

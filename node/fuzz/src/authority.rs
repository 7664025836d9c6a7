//! The client-to-server HTTP/2 stream through the `:authority` rewriter, which parses frames
//! and HPACK before the HTTP/2 server does.
//!
//! Input: `[split: u16 LE]`, then the byte stream (connection preface included). Properties:
//! - it is refused or rewritten, never a panic;
//! - it is rewritten alike whether it arrives whole or in two reads split anywhere;
//! - what is left waiting for more is less than one frame the server would accept;
//! - every header block it writes decodes with a fresh HPACK decoder, as the server's
//!   decoder, which has seen only what the rewriter wrote, must decode it;
//! - once it passes the connection through (its first header block needed no rewriting),
//!   what follows is written as it came.

use std::borrow::Cow;

use consensus_node::api::authority::{
    CONTINUATION, END_HEADERS, FRAME_HEADER, FrameRewriter, HEADERS, MAX_FRAME, PREFACE_LEN, PRIORITY,
};
use loona_hpack::Decoder;

use crate::Fields;

/// What the rewriter made of the stream read in `reads`.
#[derive(Debug, PartialEq)]
struct Rewritten {
    output: Vec<u8>,
    /// What is left of the input, waiting for more.
    left: Vec<u8>,
    passing_through_after: Option<(usize, usize)>,
}

fn rewrite(reads: &[&[u8]]) -> Result<Rewritten, String> {
    let mut rewriter = FrameRewriter::default();
    let (mut input, mut output) = (Vec::new(), Vec::new());
    for read in reads {
        input.extend_from_slice(read);
        rewriter.process(&mut input, &mut output).map_err(|e| e.to_string())?;
    }
    Ok(Rewritten { output, left: input, passing_through_after: rewriter.passing_through_after() })
}

/// Decodes every header block of the rewriter's output (which never pads).
fn decode_header_blocks(output: &[u8]) {
    let mut decoder = Decoder::new();
    let mut frames = output.get(PREFACE_LEN..).unwrap_or_default();
    let mut block = Vec::new();
    while frames.len() >= FRAME_HEADER {
        let len = usize::from(frames[0]) << 16 | usize::from(frames[1]) << 8 | usize::from(frames[2]);
        let (kind, flags) = (frames[3], frames[4]);
        assert!(len <= MAX_FRAME, "the rewriter wrote a frame of {len} bytes");
        let payload =
            frames.get(FRAME_HEADER..FRAME_HEADER + len).expect("the rewriter wrote part of a frame");
        frames = &frames[FRAME_HEADER + len..];
        match kind {
            HEADERS if flags & PRIORITY != 0 => {
                block.extend_from_slice(payload.get(5..).expect("a HEADERS frame with its priority"))
            }
            HEADERS | CONTINUATION => block.extend_from_slice(payload),
            _ => continue,
        }
        if flags & END_HEADERS != 0 {
            decoder
                .decode_with_cb(&block, |_: Cow<[u8]>, _: Cow<[u8]>| {})
                .unwrap_or_else(|e| panic!("a header block the rewriter wrote does not decode: {e:?}"));
            block.clear();
        }
    }
    assert!(frames.is_empty(), "the rewriter wrote part of a frame");
}

pub fn check(data: &[u8]) {
    let mut fields = Fields::new(data);
    let split = usize::from(fields.u16());
    let stream = fields.remainder();
    let whole = rewrite(&[stream]);
    let (first, second) = stream.split_at(split.min(stream.len()));
    assert_eq!(rewrite(&[first, second]), whole, "split at {split}, the stream was rewritten otherwise");
    if let Ok(Rewritten { output, left, passing_through_after }) = whole {
        assert!(left.len() < FRAME_HEADER + MAX_FRAME, "{} bytes held back for a frame", left.len());
        match passing_through_after {
            Some((read, written)) => {
                decode_header_blocks(&output[..written]);
                assert_eq!(&output[written..], &stream[read..], "passed through, yet changed");
            }
            None => decode_header_blocks(&output),
        }
    }
}

//! Helpers shared by Musubi's fuzz targets (`fuzz_targets/`). Not a test library for the
//! workspace: only the targets use it.

use std::future::Future;
use std::task::{Context, Poll, Waker};

/// The `musubi up` file parser, compiled from the CLI's own source: the `musubi` library does
/// not export it (it lives in the binary), and depending on the CLI would build its demo protos.
#[allow(dead_code)]
#[path = "../../cli/src/spec.rs"]
pub mod up_spec;

/// Runs a future that needs no I/O and no timer (reading a byte slice, validating against a
/// fixed key set) to completion with one poll. Pending would mean it waits for something that
/// can never come, which is itself a bug worth a crash.
pub fn ready<F: Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("a future over in-memory input is pending"),
    }
}

/// The prefix lengths to check for a buffer of `len` bytes: every one of a short buffer, an
/// even spread plus the last few of a long one (checking all of 8 KiB would be quadratic).
pub fn prefix_ends(len: usize) -> Vec<usize> {
    const ALL_UP_TO: usize = 1024;
    const SPREAD: usize = 256;
    if len <= ALL_UP_TO {
        return (0..len).collect();
    }
    let mut ends: Vec<usize> = (0..SPREAD).map(|i| i * len / SPREAD).collect();
    ends.extend(len.saturating_sub(16)..len);
    ends.dedup();
    ends
}

/// Splits `data` at its first NUL byte: two inputs from one (the NUL is dropped).
pub fn split_nul(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = data.iter().position(|b| *b == 0)?;
    Some((&data[..at], &data[at + 1..]))
}

//! Protocol detection on a connection's first bytes: `classify` must decide (or ask for more)
//! on anything, including every prefix of the input, which is what a peer that sends its bytes
//! one segment at a time makes the proxy see; and a decision, once made, must not change as
//! more bytes arrive (else the verdict would depend on how the client split its bytes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_proxy::detect::{Verdict, classify};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for end in musubi_fuzz::prefix_ends(data.len()) {
        let verdict = classify(&data[..end]);
        if matches!(verdict, Verdict::Known(_)) {
            assert_eq!(
                verdict,
                whole,
                "the first {end} bytes decided {verdict:?}, but all {} bytes give {whole:?}",
                data.len()
            );
        }
    }
});

//! Protocol detection on a plaintext connection's first bytes: `classify` must decide (or ask
//! for more) on anything, including every prefix of the input, which is what a peer that sends
//! its bytes one segment at a time makes the proxy see.
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_proxy::detect::{Verdict, classify};

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for end in musubi_fuzz::prefix_ends(data.len()) {
        let verdict = classify(&data[..end]);
        if cfg!(feature = "detect-prefix-stable") && matches!(verdict, Verdict::Known(_)) {
            assert_eq!(
                verdict,
                whole,
                "the first {end} bytes decided {verdict:?}, but all {} bytes give {whole:?}",
                data.len()
            );
        }
    }
});

//! The transport header a client proxy sends first on every mTLS connection: decoding must
//! refuse or accept any bytes without panicking, `read` must take exactly the header and
//! agree with `decode_body`, and whatever decodes must re-encode to the same header.
#![no_main]

use libfuzzer_sys::fuzz_target;
use musubi_fuzz::ready;
use musubi_proxy::transport::{Header, MAGIC, MAX_LEN};

/// Longest authority `Header::encode` writes; longer ones are cut (they are informational).
const MAX_AUTHORITY: usize = 255;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = Header::decode_body(data) {
        round_trip(&header);
    }

    let mut rest = data;
    let read = ready(Header::read(&mut rest));
    if let Some(len) = framed_len(data) {
        assert_eq!(read, Header::decode_body(&data[6..6 + len]));
        assert_eq!(
            rest.len(),
            data.len() - 6 - len,
            "read must consume the header and nothing after it"
        );
    } else {
        assert!(
            read.is_err(),
            "{read:?} from bytes that are not one whole header"
        );
    }
});

/// The body length, when `data` starts with a whole header of an acceptable size.
fn framed_len(data: &[u8]) -> Option<usize> {
    let prefix = data.get(..6)?;
    if prefix[..4] != MAGIC {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([prefix[4], prefix[5]]));
    (len <= MAX_LEN && data.len() >= 6 + len).then_some(len)
}

fn round_trip(header: &Header) {
    let bytes = header.encode();
    let mut rest = &bytes[..];
    let again = match ready(Header::read(&mut rest)) {
        Ok(h) => h,
        Err(e) => panic!("{header:?} encodes to {bytes:02x?}, which does not decode: {e}"),
    };
    assert!(rest.is_empty(), "encode wrote bytes after the header");
    match &header.authority {
        Some(long) if long.len() > MAX_AUTHORITY => {
            // Cut, but still the same connection: port and protocol, and a prefix of the name.
            assert_eq!((again.port, again.protocol), (header.port, header.protocol));
            let cut = again.authority.as_deref().unwrap_or_default();
            assert!(
                cut.len() <= MAX_AUTHORITY && long.starts_with(cut),
                "{again:?}"
            );
        }
        _ => assert_eq!(&again, header),
    }
}

//! What the proxy's connections are made of: the transport header between proxies, streams
//! whose first bytes were read ahead (for detection) and are replayed, and the opaque copy.

pub mod copy;
pub mod header;
pub mod prefixed;

pub use header::{Header, HeaderError, MAGIC, MAX_LEN, Protocol};
pub use prefixed::{FirstBytes, Prefixed, read_first};

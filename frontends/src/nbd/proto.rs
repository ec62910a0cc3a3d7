//! The NBD wire format: constants, and pure encoders and decoders of the fixed newstyle
//! handshake and of simple-reply transmission.
//!
//! Role: everything that knows byte layouts lives here, with no I/O, so it can be tested on
//! byte slices (including arbitrary ones). [`super::server`] does the reading and writing.
//!
//! Invariants:
//! - every decoder takes a slice of any length and content and returns `Err`, never panics;
//! - all integers are big-endian (network byte order), as the protocol requires;
//! - encoders produce exactly the layout of the protocol document (NetworkBlockDevice/nbd,
//!   `doc/proto.md`), which is the reference for every constant below.

use std::fmt;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flags (server → client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server will not send 124 zero bytes after `NBD_OPT_EXPORT_NAME`, if asked.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client → server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Export is read-only (never set by Ballast).
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` is supported.
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// A flush on any connection covers writes completed on every connection.
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Abort the handshake.
pub const OPT_ABORT: u32 = 2;
/// List exports.
pub const OPT_LIST: u32 = 3;
/// TLS (not supported).
pub const OPT_STARTTLS: u32 = 5;
/// Describe an export.
pub const OPT_INFO: u32 = 6;
/// Describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Structured replies (not supported).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export in a `NBD_OPT_LIST` answer.
pub const REP_SERVER: u32 = 2;
/// One information item of `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Error replies have bit 31 set.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// The option is refused by server policy (the volume is attached on another live node).
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// The option is malformed.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// No such export.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option error: the server requires TLS first (`NBD_REP_ERR_TLS_REQD`).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// The option's payload is too large.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information types.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write the payload.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Discard.
pub const CMD_TRIM: u16 = 4;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_WRITE_ZEROES` must not punch a hole (advisory for us; see the module docs of
/// [`super`]).
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error numbers of the protocol (they are Linux's values, fixed by the protocol).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Bad argument (unaligned, out of range read, unknown command).
pub const EINVAL: u32 = 22;
/// No space (write out of range, pool full).
pub const ENOSPC: u32 = 28;
/// Request too large.
pub const EOVERFLOW: u32 = 75;
/// Not supported.
pub const ENOTSUP: u32 = 95;
/// The server is shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Length of the server's initial greeting.
pub const GREETING_LEN: usize = 18;
/// Length of a client option header.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The longest export name accepted (the protocol's limit for strings).
pub const MAX_STRING: usize = 4096;

/// A decoding failure: the bytes do not follow the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The input is shorter than the structure.
    #[error("message too short: {0} bytes")]
    Short(usize),
    /// A magic number is wrong.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// A field is inconsistent with the message length or limits.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

fn be_u16(b: &[u8], at: usize) -> Result<u16, ProtoError> {
    b.get(at..at + 2)
        .map(|s| u16::from_be_bytes([s[0], s[1]]))
        .ok_or(ProtoError::Short(b.len()))
}

fn be_u32(b: &[u8], at: usize) -> Result<u32, ProtoError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or(ProtoError::Short(b.len()))
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, ProtoError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(ProtoError::Short(b.len()))
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Decode the client's flags; unknown flags are an error (the server must then close).
pub fn decode_client_flags(b: &[u8]) -> Result<u32, ProtoError> {
    let flags = be_u32(b, 0)?;
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::Malformed("client flags"));
    }
    Ok(flags)
}

/// A client option header: which option and how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// The length of its data.
    pub len: u32,
}

/// Decode an option header (`IHAVEOPT`, option, length).
pub fn decode_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(b, 0)?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(b, 8)?,
        len: be_u32(b, 12)?,
    })
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// The export name.
    pub name: String,
    /// The information types the client asked for.
    pub requests: Vec<u16>,
}

/// Decode the data of `NBD_OPT_INFO`/`NBD_OPT_GO`: name length, name, count, info types.
pub fn decode_info_request(b: &[u8]) -> Result<InfoRequest, ProtoError> {
    let name_len = be_u32(b, 0)? as usize;
    if name_len > MAX_STRING {
        return Err(ProtoError::Malformed("export name length"));
    }
    let name = b
        .get(4..4 + name_len)
        .ok_or(ProtoError::Malformed("export name length"))?;
    let name = std::str::from_utf8(name)
        .map_err(|_| ProtoError::Malformed("export name (not UTF-8)"))?
        .to_owned();
    let count = be_u16(b, 4 + name_len)? as usize;
    let rest = &b[6 + name_len..];
    if rest.len() != count * 2 {
        return Err(ProtoError::Malformed("information request count"));
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// Decode the data of `NBD_OPT_EXPORT_NAME`: the whole data is the name.
pub fn decode_export_name(b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > MAX_STRING {
        return Err(ProtoError::Malformed("export name length"));
    }
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| ProtoError::Malformed("export name (not UTF-8)"))
}

/// An option reply: magic, option, reply type, length, data.
pub fn option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// The data of an `NBD_REP_SERVER` reply naming one export.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_NAME`.
pub fn info_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + name.len());
    out.extend_from_slice(&INFO_NAME.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The data of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred, maximum.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&min.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&max.to_be_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags and, unless `no_zeroes`, 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(134);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + 124, 0);
    }
    out
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// The client's cookie (handle), echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes (of the payload for writes).
    pub len: u32,
}

impl Request {
    /// Encode (used by tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out[4..6].copy_from_slice(&self.flags.to_be_bytes());
        out[6..8].copy_from_slice(&self.kind.to_be_bytes());
        out[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        out[16..24].copy_from_slice(&self.offset.to_be_bytes());
        out[24..].copy_from_slice(&self.len.to_be_bytes());
        out
    }
}

/// Decode a transmission request header.
pub fn decode_request(b: &[u8]) -> Result<Request, ProtoError> {
    let magic = be_u32(b, 0)?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic(magic.into()));
    }
    Ok(Request {
        flags: be_u16(b, 4)?,
        kind: be_u16(b, 6)?,
        cookie: be_u64(b, 8)?,
        offset: be_u64(b, 16)?,
        len: be_u32(b, 24)?,
    })
}

/// A simple reply header: magic, error, cookie.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A command type's name, for logs.
#[derive(Debug, Clone, Copy)]
pub struct CmdName(pub u16);

impl fmt::Display for CmdName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            CMD_READ => f.write_str("READ"),
            CMD_WRITE => f.write_str("WRITE"),
            CMD_DISC => f.write_str("DISC"),
            CMD_FLUSH => f.write_str("FLUSH"),
            CMD_TRIM => f.write_str("TRIM"),
            CMD_WRITE_ZEROES => f.write_str("WRITE_ZEROES"),
            n => write!(f, "command {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn option_header_round_trip() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            decode_option_header(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                len: 7
            })
        );
        b[0] ^= 1;
        assert!(matches!(
            decode_option_header(&b),
            Err(ProtoError::BadMagic(_))
        ));
        assert_eq!(decode_option_header(&b[..5]), Err(ProtoError::Short(5)));
    }

    #[test]
    fn info_request_decodes() {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"vol");
        b.extend_from_slice(&2u16.to_be_bytes());
        b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        b.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            decode_info_request(&b),
            Ok(InfoRequest {
                name: "vol".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME],
            })
        );
        // A count that disagrees with the length is refused.
        b.pop();
        assert!(decode_info_request(&b).is_err());
        // A name longer than the data is refused.
        assert!(decode_info_request(&[0, 0, 0, 9, b'a']).is_err());
    }

    #[test]
    fn client_flags() {
        assert_eq!(decode_client_flags(&[0, 0, 0, 3]), Ok(3));
        assert!(decode_client_flags(&[0, 0, 0, 4]).is_err());
        assert!(decode_client_flags(&[0, 0]).is_err());
    }

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            cookie: 0xdead_beef,
            offset: 4096,
            len: 8192,
        };
        assert_eq!(decode_request(&r.encode()), Ok(r));
        let mut bad = r.encode();
        bad[3] = 0;
        assert!(decode_request(&bad).is_err());
    }

    #[test]
    fn reply_layouts() {
        let r = simple_reply(EINVAL, 7);
        assert_eq!(&r[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u32::from_be_bytes(r[4..8].try_into().unwrap()), 22);
        assert_eq!(u64::from_be_bytes(r[8..].try_into().unwrap()), 7);
        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(info_export(1, 2).len(), 12);
        assert_eq!(info_block_size(1, 2, 3).len(), 14);
        assert_eq!(export_name_reply(1, 2, false).len(), 134);
        assert_eq!(export_name_reply(1, 2, true).len(), 10);
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_client_flags(&bytes);
            let _ = decode_option_header(&bytes);
            let _ = decode_info_request(&bytes);
            let _ = decode_export_name(&bytes);
            let _ = decode_request(&bytes);
        }

        #[test]
        fn info_requests_round_trip(name in "[a-z0-9-]{0,40}", reqs in proptest::collection::vec(any::<u16>(), 0..8)) {
            let mut b = (name.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
            for r in &reqs {
                b.extend_from_slice(&r.to_be_bytes());
            }
            prop_assert_eq!(decode_info_request(&b), Ok(InfoRequest { name, requests: reqs }));
        }

        #[test]
        fn requests_round_trip(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
            let r = Request { flags, kind, cookie, offset, len };
            prop_assert_eq!(decode_request(&r.encode()), Ok(r));
        }
    }
}

//! A raw NBD client for the scenarios (fixed newstyle handshake, simple replies), and the
//! protocol constants it speaks: for the requests real clients do not send on purpose, and to
//! hold a connection open across an event.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[allow(missing_docs)]
mod consts {
    pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
    pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    pub const REQUEST_MAGIC: u32 = 0x2560_9513;
    pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
    pub const OPT_LIST: u32 = 3;
    pub const OPT_GO: u32 = 7;
    pub const OPT_STRUCTURED_REPLY: u32 = 8;
    pub const OPT_ABORT: u32 = 2;
    pub const REP_ACK: u32 = 1;
    pub const REP_SERVER: u32 = 2;
    pub const REP_INFO: u32 = 3;
    pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
    pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
    pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
    pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
    pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
    pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
    pub const OPT_EXPORT_NAME: u32 = 1;
    pub const OPT_INFO: u32 = 6;
    pub const OPT_STARTTLS: u32 = 5;
    pub const CMD_READ: u16 = 0;
    pub const CMD_WRITE: u16 = 1;
    pub const CMD_DISC: u16 = 2;
    pub const CMD_FLUSH: u16 = 3;
    pub const CMD_TRIM: u16 = 4;
    pub const CMD_WRITE_ZEROES: u16 = 6;
    pub const FLAG_FUA: u16 = 1;
    pub const EPERM: u32 = 1;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
}
pub use consts::*;

/// A byte stream to a server.
pub trait Stream: Read + Write + Send + std::fmt::Debug {}
impl<T: Read + Write + Send + std::fmt::Debug> Stream for T {}

/// A raw NBD client on a unix socket (or a TCP connection).
#[derive(Debug)]
pub struct Raw {
    /// The connection, for bytes the methods do not send.
    pub s: Box<dyn Stream>,
}

impl Raw {
    /// Connect and do the greeting and client flags (fixed newstyle, no zeroes).
    pub fn connect(path: &Path) -> Self {
        let s = UnixStream::connect(path).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self::greet(Box::new(s))
    }

    /// [`Raw::connect`] over TCP.
    pub fn connect_tcp(addr: &str) -> Self {
        let s = std::net::TcpStream::connect(addr).expect("connect to the NBD address");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Self::greet(Box::new(s))
    }

    fn greet(s: Box<dyn Stream>) -> Self {
        let mut raw = Self { s };
        let mut greeting = [0u8; 18];
        raw.s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        raw.s.write_all(&3u32.to_be_bytes()).unwrap();
        raw
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// One option reply: (option, type, data).
    pub fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).unwrap();
        (option, kind, data)
    }

    /// `NBD_OPT_GO` for `name`: `Ok(size)` or `Err(error reply type)`.
    pub fn go(&mut self, name: &str) -> Result<u64, u32> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
        self.send_option(OPT_GO, &data);
        let mut size = None;
        loop {
            let (option, kind, data) = self.option_reply();
            assert_eq!(option, OPT_GO);
            match kind {
                REP_INFO if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => return Ok(size.expect("NBD_INFO_EXPORT before the ACK")),
                err => return Err(err),
            }
        }
    }

    pub fn send_request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&b).unwrap();
    }

    /// A simple reply header: (error, cookie).
    pub fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u32::from_be_bytes(h[..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..].try_into().unwrap()),
        )
    }

    /// A request without payload and its reply's error.
    pub fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u32) -> u32 {
        self.send_request(kind, flags, 9, offset, len);
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 9);
        error
    }

    pub fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.send_request(CMD_WRITE, flags, 10, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 10);
        error
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send_request(CMD_READ, 0, 11, offset, len);
        let (error, cookie) = self.reply();
        assert_eq!(cookie, 11);
        if error != 0 {
            return Err(error);
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        Ok(data)
    }

    /// Whether the server closed the connection (reads end of stream).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

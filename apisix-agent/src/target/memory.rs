//! Reads of a target process's memory with `process_vm_readv`. Every read may fail (the
//! process exited, the address is unmapped or garbage) and every length is bounded by the
//! caller; nothing read here is trusted without validation by its user.
//!
//! Hooks: `process_vm_readv(2)`. Metrics: none.

use std::io;

/// Largest single read allowed.
pub const MAX_READ: usize = 1 << 20;

/// A process whose memory can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pid: u32,
}

impl Memory {
    /// The memory of process `pid`.
    pub fn new(pid: u32) -> Self {
        Self { pid }
    }

    /// Fills `buf` from `addr`; fails unless every byte was read.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > MAX_READ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read too large",
            ));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as usize as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: both iovecs describe valid memory of the given lengths; the remote one is
        // only interpreted by the kernel in the target's address space.
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read"));
        }
        Ok(())
    }

    /// Reads `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.read_into(addr, &mut buf)?;
        Ok(buf)
    }

    /// Reads a little-endian u64.
    #[cfg(test)]
    pub fn u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_into(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_and_rejects_bad_addresses() {
        let value: u64 = 0x1122_3344_5566_7788;
        let me = Memory::new(std::process::id());
        assert_eq!(me.u64(&value as *const u64 as u64).expect("read"), value);
        assert!(me.u64(8).is_err(), "address 8 must not be readable");
        assert!(me.read(0, MAX_READ + 1).is_err());
    }
}

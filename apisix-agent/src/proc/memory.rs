//! A target's memory behind one trait, [`TargetMemory`]: the bounded reads the LuaJIT
//! readers (traces, prototypes, strings, tables, heap fields) make. [`Memory`] reads a live
//! process with `process_vm_readv`; [`super::recorded::RecordedMemory`] serves reads from a
//! fixture recorded from a real run, for root-free tests. Every read may fail (the process
//! exited, the address is unmapped or garbage) and every length is bounded by the caller;
//! nothing read here is trusted without validation by its user.
//!
//! Hooks: `process_vm_readv(2)`. Metrics: none.

use std::io;

/// Largest single read allowed.
pub const MAX_READ: usize = 1 << 20;

/// The memory of one target: whole reads or none, each at most [`MAX_READ`] bytes.
pub trait TargetMemory: std::fmt::Debug {
    /// Fills `buf` from `addr`; fails unless every byte was read (and when `buf` is larger
    /// than [`MAX_READ`]).
    fn read_into(&self, addr: u64, buf: &mut [u8]) -> io::Result<()>;

    /// Reads `len` bytes at `addr`.
    fn read(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        if len > MAX_READ {
            return Err(too_large());
        }
        let mut buf = vec![0u8; len];
        self.read_into(addr, &mut buf)?;
        Ok(buf)
    }
}

/// The error of a read larger than [`MAX_READ`].
pub fn too_large() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "read too large")
}

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

    /// The process read.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Reads a little-endian u64.
    #[cfg(test)]
    pub fn u64(&self, addr: u64) -> io::Result<u64> {
        let mut b = [0u8; 8];
        self.read_into(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl TargetMemory for Memory {
    fn read_into(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > MAX_READ {
            return Err(too_large());
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

//! `TCP_NODELAY` for the pool's connections.
//!
//! sqlx opens its TCP sockets without `TCP_NODELAY` and offers no way to set it. For ordinary
//! queries that does not matter (each round trip is one write), but `COPY` ends with a tiny
//! `CopyDone` message right after the data: Nagle's algorithm holds it until the server
//! acknowledges the data, and the server delays that acknowledgement by 40 ms because it is
//! waiting for more. Every `COPY`, and so every write, then took 40 ms longer (measured: 44 ms
//! per `COPY` of one row on loopback). The connection tells the server's view of its own port
//! (`inet_client_port()`); the socket with that local port is ours to configure.

use std::os::fd::RawFd;

/// Sets `TCP_NODELAY` on this process's TCP socket bound to local port `port`.
pub(super) fn set_on_local_port(port: u16) {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        if local_port(fd) == Some(port) {
            let on: libc::c_int = 1;
            // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local; on an fd
            // that is not (or no longer) a TCP socket it fails harmlessly.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

fn local_port(fd: RawFd) -> Option<u16> {
    // SAFETY: an all-zero sockaddr_storage is valid; getsockname writes at most `len` bytes
    // into it and fails harmlessly on fds that are not sockets.
    unsafe {
        let mut address: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(
            fd,
            (&mut address as *mut libc::sockaddr_storage).cast(),
            &mut len,
        ) != 0
        {
            return None;
        }
        match address.ss_family as libc::c_int {
            libc::AF_INET => {
                let v4: &libc::sockaddr_in = &*(&address as *const libc::sockaddr_storage).cast();
                Some(u16::from_be(v4.sin_port))
            }
            libc::AF_INET6 => {
                let v6: &libc::sockaddr_in6 = &*(&address as *const libc::sockaddr_storage).cast();
                Some(u16::from_be(v6.sin6_port))
            }
            _ => None,
        }
    }
}

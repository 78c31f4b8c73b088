//! Errno mapping both ways: host errno to the NBD error set (server replies) and NBD error
//! values and option error replies to host errnos (client side).

use crate::{
    EINVAL, EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN, REP_ERR_BLOCK_SIZE_REQD,
    REP_ERR_INVALID, REP_ERR_PLATFORM, REP_ERR_POLICY, REP_ERR_SHUTDOWN, REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP,
};

/// Maps a device errno to the NBD error set (server side). Errnos outside the set become
/// `EIO`; a device that went away is `ESHUTDOWN`, so the client reconnects.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EBADF | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ENODEV | libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Maps an NBD error value to an errno (client side). Unknown values count as `EINVAL`, as
/// the spec asks.
pub fn nbd_to_errno(nbd_error: u32) -> i32 {
    match nbd_error {
        EPERM => libc::EPERM,
        EIO => libc::EIO,
        ENOMEM => libc::ENOMEM,
        EINVAL => libc::EINVAL,
        ENOSPC => libc::ENOSPC,
        EOVERFLOW => libc::EOVERFLOW,
        ENOTSUP => libc::ENOTSUP,
        ESHUTDOWN => libc::ESHUTDOWN,
        _ => libc::EINVAL,
    }
}

/// The errno and text for an `NBD_REP_ERR_*` option reply (client side).
pub fn option_error(reply: u32) -> (i32, &'static str) {
    match reply {
        REP_ERR_UNSUP => (libc::ENOTSUP, "option not supported"),
        REP_ERR_POLICY => (libc::EACCES, "forbidden by server policy"),
        REP_ERR_INVALID => (libc::EINVAL, "invalid option"),
        REP_ERR_PLATFORM => (libc::ENOTSUP, "not supported on the server's platform"),
        REP_ERR_TLS_REQD => (libc::EACCES, "tls required"),
        REP_ERR_UNKNOWN => (libc::ENOENT, "unknown export"),
        REP_ERR_SHUTDOWN => (libc::ESHUTDOWN, "server is shutting down"),
        REP_ERR_BLOCK_SIZE_REQD => (libc::EINVAL, "block size negotiation required"),
        REP_ERR_TOO_BIG => (libc::E2BIG, "request too big"),
        _ => (libc::EPROTO, "unknown error reply"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NBD_ERRORS: [u32; 8] = [
        EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN,
    ];

    #[test]
    fn every_nbd_error_round_trips_through_its_errno() {
        for e in NBD_ERRORS {
            assert_eq!(errno_to_nbd(nbd_to_errno(e)), e, "nbd error {e}");
        }
    }

    #[test]
    fn errnos_outside_the_set_are_mapped() {
        assert_eq!(errno_to_nbd(libc::EROFS), EPERM);
        assert_eq!(errno_to_nbd(libc::ENODEV), ESHUTDOWN);
        assert_eq!(errno_to_nbd(libc::EPROTO), EIO);
        assert_eq!(nbd_to_errno(9999), libc::EINVAL);
        assert_eq!(nbd_to_errno(0), libc::EINVAL);
    }

    #[test]
    fn option_errors_have_errnos() {
        assert_eq!(option_error(REP_ERR_UNKNOWN).0, libc::ENOENT);
        assert_eq!(option_error(REP_ERR_POLICY).0, libc::EACCES);
        assert_eq!(option_error(REP_ERR_TOO_BIG).0, libc::E2BIG);
        assert_eq!(option_error(crate::REP_FLAG_ERROR | 99).0, libc::EPROTO);
    }
}

//! The one place where library errors become errno values.

use fuser::Errno;

use super::core::FsError;
use crate::namespace::NsError;
use crate::store::StoreError;

fn from_io(e: &std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::EIO, Errno::from_i32)
}

pub trait ToErrno {
    fn to_errno(&self) -> Errno;
}

impl ToErrno for FsError {
    fn to_errno(&self) -> Errno {
        match self {
            FsError::Namespace(e) => match e {
                NsError::NotFound => Errno::ENOENT,
                NsError::Exists => Errno::EEXIST,
                NsError::NotDir => Errno::ENOTDIR,
                NsError::IsDir => Errno::EISDIR,
                NsError::NotEmpty => Errno::ENOTEMPTY,
                NsError::NameTooLong => Errno::ENAMETOOLONG,
                NsError::Invalid(_) => Errno::EINVAL,
            },
            FsError::Store(StoreError::NoSpace { .. }) => Errno::ENOSPC,
            FsError::Store(StoreError::Io { source, .. }) => from_io(source),
            FsError::BadHandle(_) => Errno::EBADF,
            FsError::Stale(_) => Errno::ESTALE,
            FsError::NotPermitted(_) => Errno::EPERM,
            FsError::ReadOnly(_) => Errno::EROFS,
            FsError::NoAttr => Errno::NO_XATTR,
            FsError::Range(_) => Errno::ERANGE,
            FsError::Unsupported(_) => Errno::EOPNOTSUPP,
            FsError::Io { source, .. } => from_io(source),
        }
    }
}

/// Errors a caller provokes in normal use; logged at debug, not as faults.
pub fn is_expected(errno: Errno) -> bool {
    [
        Errno::ENOENT,
        Errno::EEXIST,
        Errno::ENOTDIR,
        Errno::EISDIR,
        Errno::ENOTEMPTY,
        Errno::ENAMETOOLONG,
        Errno::EINVAL,
        Errno::NO_XATTR,
        Errno::ERANGE,
        Errno::EOPNOTSUPP,
        Errno::EPERM,
        Errno::EROFS,
        Errno::ESTALE,
    ]
    .contains(&errno)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_user_mistakes_to_their_errno() {
        let cases = [
            (FsError::from(NsError::NotFound), libc::ENOENT),
            (NsError::Exists.into(), libc::EEXIST),
            (NsError::NotDir.into(), libc::ENOTDIR),
            (NsError::IsDir.into(), libc::EISDIR),
            (NsError::NotEmpty.into(), libc::ENOTEMPTY),
            (NsError::NameTooLong.into(), libc::ENAMETOOLONG),
            (
                StoreError::NoSpace {
                    used: 1,
                    capacity: 1,
                }
                .into(),
                libc::ENOSPC,
            ),
            (FsError::NoAttr, libc::ENODATA),
        ];
        for (err, code) in cases {
            assert_eq!(err.to_errno().code(), code, "{err}");
        }
    }
}

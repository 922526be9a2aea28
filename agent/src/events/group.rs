//! The decision log's group (`[events] sink_group`): a group name looked up
//! in the system's group database when the agent starts.

use std::{ffi::CString, io};

/// The id of group `name`; `""` is none (the file keeps the agent's group).
///
/// # Errors
/// No such group, or the group database cannot be read.
pub fn group_id(name: &str) -> io::Result<Option<u32>> {
    if name.is_empty() {
        return Ok(None);
    }
    let c_name = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the group name"))?;
    let mut buf = vec![0_u8; 4096];
    loop {
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is to a live local; `buf.len()` is its size.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &raw mut group,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &raw mut found,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if found.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no group named {name:?}"),
            ));
        }
        return Ok(Some(group.gr_gid));
    }
}

#[cfg(test)]
mod tests {
    use super::group_id;

    #[test]
    fn root_is_group_zero_and_empty_is_none() {
        assert_eq!(group_id("root").expect("root exists"), Some(0));
        assert_eq!(group_id("").expect("empty"), None);
    }

    #[test]
    fn an_unknown_group_is_an_error_naming_it() {
        let err = group_id("no-such-group-bh").expect_err("unknown");
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(err.to_string().contains("\"no-such-group-bh\""), "{err}");
    }
}

//! Opening a map of the loaded object by name, with errors that name it.

use aya::{
    maps::{Map, MapError},
    Ebpf,
};

use super::KernelError;

/// The map `name`, to write.
pub(super) fn map_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<&'a mut Map, Error = MapError>,
{
    let m = ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(m).map_err(map_err(name))
}

/// The map `name`, to read.
pub(super) fn map_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<T, KernelError>
where
    T: TryFrom<&'a Map, Error = MapError>,
{
    let m = ebpf.map(name).ok_or(KernelError::MissingMap(name))?;
    T::try_from(m).map_err(map_err(name))
}

pub(super) fn map_err(name: &'static str) -> impl Fn(MapError) -> KernelError {
    move |source| KernelError::Map { name, source }
}

/// A removal that found nothing to remove is fine: the end state is the
/// one wanted. (aya reports a missing key on delete as the syscall's
/// ENOENT, not as `KeyNotFound`.)
pub(super) fn removed(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

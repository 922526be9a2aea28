//! Policy files: parsed into serde structs (`file`), then validated, all
//! errors at once (`validate`), into the checked model (`model`) that alone
//! reaches the kernel (through `crate::compile`).

mod error;
mod file;
mod load;
mod model;
mod validate;

pub use error::{position, PolicyError, PolicyErrors};
pub use load::{load_dir, load_files, load_texts, FileText};
pub use model::{
    BindPolicy, Closeness, EgressRule, Executable, IngressRule, Mode, PolicySet, PortRange,
    Protocol, RuleRef, Section, Selector, Service, SocketProtocol, SocketsPolicy, UnitName,
};

#[cfg(test)]
mod tests;

//! Fleet mode: every agent's rows in ClickHouse, and the fleet's service
//! graph and blast radius across hosts read back from them.

pub mod inventory;
pub mod model;
pub mod read;

//! ovl-controller: declarative VXLAN overlays with kernel IPsec ESP.
//!
//! Data flows one way (functional core, imperative shell):
//! ```text
//! spec file --spec::parse--> Spec --desired::build--> KernelState (desired)
//! kernel --kernel::dump--> KernelState (observed);  plan::plan(desired, observed) --> Plan
//! Plan --kernel::execute--> netlink
//! ```

pub mod agent;
pub mod control;
pub mod desired;
pub mod identity;
pub mod kernel;
pub mod keys;
pub mod logging;
pub mod memory;
pub mod plan;
pub mod progress;
pub mod reconcile;
pub mod spec;
pub mod state;
pub mod status;

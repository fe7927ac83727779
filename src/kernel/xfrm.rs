// PLACEHOLDER (lead): replaced by the XFRM layer; exists only so the crate compiles meanwhile.
use std::collections::BTreeMap;
use std::net::IpAddr;

use super::KernelError;
use crate::plan::Change;
use crate::state::{Policy, PolicyId, Sa, SaId};

pub async fn dump(
    _h: &xfrmnetlink::Handle,
) -> Result<(BTreeMap<PolicyId, Policy>, BTreeMap<SaId, Sa>), KernelError> {
    Ok((BTreeMap::new(), BTreeMap::new()))
}
pub async fn execute(_h: &xfrmnetlink::Handle, c: &Change) -> Result<(), KernelError> {
    Err(KernelError::Unexpected { what: "change", detail: c.to_string() })
}
pub async fn check_esp(_h: &xfrmnetlink::Handle, _l: IpAddr) -> Result<(), KernelError> {
    Err(KernelError::NoEsp { detail: "placeholder".into() })
}

use super::{Failure, SpecFile, load_spec_text};

pub fn run(args: &SpecFile, node: Option<&str>) -> Result<(), Failure> {
    // Named as errors name it (`<stdin>` for `-`).
    let (spec, _, source) = load_spec_text(&args.file)?;
    // A --node the spec does not know is reported, as `apply` reports it.
    if let Some(name) = node
        && !spec.nodes.iter().any(|n| n.name.as_str() == name)
    {
        return Err(Failure::input(format!("node {name} is not in the spec")));
    }
    let encrypted = spec.networks.iter().filter(|n| n.encrypted).count();
    let count = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    outln!(
        "{}: valid: cluster {}, {}, {} ({} encrypted)",
        source,
        spec.cluster.name,
        count(spec.nodes.len(), "node"),
        count(spec.networks.len(), "network"),
        encrypted
    );
    Ok(())
}

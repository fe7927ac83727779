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
    outln!(
        "{}: valid: cluster {}, {} nodes, {} networks ({} encrypted)",
        source,
        spec.cluster.name,
        spec.nodes.len(),
        spec.networks.len(),
        encrypted
    );
    Ok(())
}

use super::{Failure, SpecFile, load_spec_text};

pub fn run(args: &SpecFile) -> Result<(), Failure> {
    // Named as errors name it (`<stdin>` for `-`).
    let (spec, _, source) = load_spec_text(&args.file)?;
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

use clap::Args;

use ovl::agent::api::{self, Request};
use ovl::kernel::Kernel;
use ovl::reconcile::{self, Keys, ReconcileError};

use super::progress::Terminal;
use super::{Common, Failure, SpecFile, load_spec_text, runtime};

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub spec: SpecFile,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[command(flatten)]
    pub spec: SpecFile,
    /// Print what would be removed and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn reconcile_failure(e: ReconcileError) -> Failure {
    if let Some(report) = e.plan_report() {
        out!("{report}");
    }
    if e.is_input_error() {
        Failure::input(e)
    } else {
        Failure::runtime(e)
    }
}

pub fn run_apply(common: &Common, args: &ApplyArgs) -> Result<(), Failure> {
    let (spec, text, source) = load_spec_text(&args.spec.file)?;
    runtime()?.block_on(async {
        // With an agent running, it applies (it holds the keys for encrypted networks).
        let request = Request::Apply {
            spec: text,
            source,
            dry_run: args.dry_run,
            node: common.node.clone(),
        };
        let _lock = match whose_turn(common, &request, args.dry_run).await? {
            Turn::Ours(lock) => lock,
            Turn::AgentDid(done) => return done,
        };
        let kernel = Kernel::connect().map_err(Failure::runtime)?;
        let node = reconcile::identify_node(&spec, common.node.as_deref(), &kernel)
            .await
            .map_err(reconcile_failure)?;
        let keys = Keys::Unavailable {
            reason: "keys for encrypted networks are agreed by the agent: start `ovl-controller agent` on this node"
                .into(),
        };
        let (terminal, sink) = Terminal::new().shared();
        kernel.set_progress(Some(sink));
        let outcome = reconcile::apply(&spec, node, &kernel, keys, args.dry_run).await;
        kernel.set_progress(None);
        if let Ok(mut t) = terminal.lock() {
            t.finish();
        }
        let dry_run_header = || {
            if args.dry_run {
                outln!("Dry run for node {}: nothing is changed.", node.name);
            }
        };
        let outcome = outcome.map_err(|e| {
            // A dry run whose plan could not start still shows that plan, under the
            // header every dry run has (as the agent's answer does).
            if e.plan_report().is_some() {
                dry_run_header();
            }
            reconcile_failure(e)
        })?;
        dry_run_header();
        out!("{}", outcome.plan_text());
        if !args.dry_run && !outcome.plan.is_empty() {
            outln!("Applied {} changes on node {}.", outcome.plan.changes.len(), node.name);
        }
        match outcome.encrypted_not_up {
            Some(e) => Err(Failure::runtime(e)),
            None => Ok(()),
        }
    })
}

pub fn run_delete(common: &Common, args: &DeleteArgs) -> Result<(), Failure> {
    let (spec, text, source) = load_spec_text(&args.spec.file)?;
    runtime()?.block_on(async {
        // With an agent running, it deletes: it drops the networks from the spec it keeps
        // true, which it would otherwise bring back at its next pass.
        let request = Request::Delete {
            spec: text,
            source,
            dry_run: args.dry_run,
            node: common.node.clone(),
        };
        let _lock = match whose_turn(common, &request, args.dry_run).await? {
            Turn::Ours(lock) => lock,
            Turn::AgentDid(done) => return done,
        };
        let kernel = Kernel::connect().map_err(Failure::runtime)?;
        // Deleting needs no node (objects are found by VNI), but a --node the spec does
        // not know is a mistake to report, as `apply` does.
        if let Some(name) = common.node.as_deref() {
            reconcile::identify_node(&spec, Some(name), &kernel)
                .await
                .map_err(reconcile_failure)?;
        }
        let (terminal, sink) = Terminal::new().shared();
        kernel.set_progress(Some(sink));
        let plan = reconcile::delete(&spec, &kernel, args.dry_run).await;
        kernel.set_progress(None);
        if let Ok(mut t) = terminal.lock() {
            t.finish();
        }
        let plan = plan.map_err(reconcile_failure)?;
        if args.dry_run {
            outln!("Dry run: nothing is changed.");
        }
        out!("{plan}");
        if !args.dry_run && !plan.is_empty() {
            outln!("Applied {} changes.", plan.changes.len());
        }
        Ok(())
    })
}

/// Sends `request` to the node's agent, showing its progress, and prints its answer.
/// `None` when no agent runs (the caller does the work itself); otherwise the outcome
/// to exit with.
async fn through_agent(
    common: &Common,
    request: &Request,
) -> Result<Option<Result<(), Failure>>, Failure> {
    let mut terminal = Terminal::new();
    let answer = api::call(&common.socket, request, &mut |p| terminal.show(p)).await;
    terminal.finish();
    let Some(response) = answer.map_err(Failure::runtime)? else {
        return Ok(None);
    };
    out!("{}", response.output);
    Ok(Some(match response.error {
        Some(e) => Err(Failure {
            code: response.code.max(1),
            message: e,
        }),
        None => Ok(()),
    }))
}

/// Who carries the request out: this run (holding the node's lock until it is dropped,
/// unless a dry run), or an agent (its outcome).
enum Turn {
    Ours(Option<nix::fcntl::Flock<std::fs::File>>),
    AgentDid(Result<(), Failure>),
}

/// A running agent carries the request out; without one, this run does, in its turn.
async fn whose_turn(common: &Common, request: &Request, dry_run: bool) -> Result<Turn, Failure> {
    if let Some(done) = through_agent(common, request).await? {
        return Ok(Turn::AgentDid(done));
    }
    // A dry run changes nothing: it needs no lock (and creates no directory).
    if dry_run {
        return Ok(Turn::Ours(None));
    }
    wait_turn(common, request).await
}

/// Serializes runs of `apply` and `delete` without an agent on this node (cron and a
/// person at once), and such runs with an agent starting: two plans made from the same
/// kernel state would trip over each other. The agent holds the same lock while it
/// runs; a run that finds the lock taken waits, and says so, and hands its request to
/// an agent as soon as one listens.
async fn wait_turn(common: &Common, request: &Request) -> Result<Turn, Failure> {
    let path = common.state_dir.join("apply.lock");
    let waited = ovl::agent::wait_for_apply_lock(&common.state_dir, async |first| {
        match through_agent(common, request).await {
            Ok(Some(done)) => return Some(Ok(Turn::AgentDid(done))),
            Err(e) => return Some(Err(e)),
            Ok(None) => {}
        }
        if first {
            eprintln!(
                "waiting for another apply or delete on this node to finish... (the lock {} \
                 is held: by a run without an agent, or by an agent listening on another \
                 --socket)",
                path.display()
            );
        }
        None
    })
    .await
    .map_err(|e| {
        if e.is_input_error() {
            Failure::input(e)
        } else {
            Failure::runtime(e)
        }
    })?;
    match waited {
        Ok(lock) => Ok(Turn::Ours(Some(lock))),
        Err(outcome) => outcome,
    }
}

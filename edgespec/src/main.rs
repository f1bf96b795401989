//! `edgespec`: the operator CLI (local cluster, model fetch, bench, link emulator).
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    anyhow::bail!("edgespec: the local cluster is not built yet (see the open issues)")
}

//! Scenario (d): placeholder.
use super::{Ctx, Report};
use anyhow::Result;

pub(super) async fn run(_ctx: &Ctx) -> Result<Report> {
    anyhow::bail!("not yet")
}

//! Whole-cluster tests for recur. The cluster (coordinator and workers) arrives with the next
//! issue; until then this crate only checks that the workspace's libraries link together.

#[cfg(test)]
mod tests {
    #[test]
    fn core_links() {
        assert_eq!(
            recur_core::model::ModelConfig::tutorial().layout().total(),
            97
        );
    }
}

//! Errors as one line: an error and every source under it, joined by ": ", for logs, JSON
//! reports (`check-kernel`, `/healthz`) and metrics-free failure reasons.
//!
//! Hooks: none. Metrics: none.

/// `e` and its sources, joined by ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_and_its_sources_make_one_line() {
        let outer = OuterError(std::io::Error::other("inner"));
        assert_eq!(super::error_chain(&outer), "outer: inner");
    }

    #[derive(Debug)]
    struct OuterError(std::io::Error);

    impl std::fmt::Display for OuterError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("outer")
        }
    }

    impl std::error::Error for OuterError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}

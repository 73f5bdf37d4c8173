//! Collecting every problem in the input, so one compile reports them all.

use std::fmt::Display;
use std::panic::{self, AssertUnwindSafe};

use proc_macro2::TokenStream;
use quote::{ToTokens, quote};

/// Gathers the errors found while parsing, instead of stopping at the first.
///
/// Parsing pushes each problem here, with the user's tokens as its span, and
/// goes on. The expansion calls [`Errors::finish`] once at the end; dropping a
/// collector that was never checked is a bug in the macro and panics (the same
/// contract as serde_derive's `Ctxt`).
#[derive(Debug)]
pub(crate) struct Errors {
    errors: Option<Vec<syn::Error>>,
}

impl Errors {
    pub(crate) fn new() -> Self {
        Self {
            errors: Some(Vec::new()),
        }
    }

    /// Records an error spanning `tokens` (from their first to their last token).
    pub(crate) fn error_spanned_by(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens.into_token_stream(), message));
    }

    /// Records an error, for example one returned by a `syn` parser.
    pub(crate) fn push(&mut self, error: syn::Error) {
        self.errors
            .as_mut()
            .expect("errors already checked")
            .push(error);
    }

    /// How many errors were recorded so far.
    pub(crate) fn count(&self) -> usize {
        self.errors.as_ref().map_or(0, Vec::len)
    }

    /// Ends the collection: `Err` holds every recorded error, combined.
    pub(crate) fn finish(mut self) -> Result<(), syn::Error> {
        let mut errors = self
            .errors
            .take()
            .expect("errors already checked")
            .into_iter();
        let Some(mut combined) = errors.next() else {
            return Ok(());
        };
        for error in errors {
            combined.combine(error);
        }
        Err(combined)
    }
}

impl Drop for Errors {
    fn drop(&mut self) {
        if self.errors.is_some() && !std::thread::panicking() {
            panic!("flotilla-macros: an error collector was dropped without being checked");
        }
    }
}

/// Runs an expansion and turns a panic inside it into a compile error, so a
/// bug in the macro reads as a message on the attribute instead of an opaque
/// "proc macro panicked". `item` is emitted unchanged next to the error, so the
/// rest of the crate still sees the user's code.
pub(crate) fn catch_panics(
    attribute: &str,
    item: TokenStream,
    expand: impl FnOnce() -> TokenStream,
) -> TokenStream {
    match panic::catch_unwind(AssertUnwindSafe(expand)) {
        Ok(tokens) => tokens,
        Err(payload) => {
            let reason = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            let message = format!(
                "internal error in `#[{attribute}]`: {reason}. This is a bug in flotilla-macros; \
                 please report it with the code this attribute is on"
            );
            quote! {
                ::core::compile_error!(#message);
                #item
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_combines_every_error_in_order() {
        let mut errors = Errors::new();
        errors.error_spanned_by(quote!(a), "first");
        errors.error_spanned_by(quote!(b), "second");
        let combined = errors.finish().unwrap_err();
        let messages: Vec<String> = combined.into_iter().map(|e| e.to_string()).collect();
        assert_eq!(messages, ["first", "second"]);
    }

    #[test]
    fn finish_without_errors_is_ok() {
        let errors = Errors::new();
        assert_eq!(errors.count(), 0);
        assert!(errors.finish().is_ok());
    }

    #[test]
    #[should_panic(expected = "dropped without being checked")]
    fn an_unchecked_collector_panics() {
        drop(Errors::new());
    }

    #[test]
    fn a_panic_becomes_a_compile_error_next_to_the_item() {
        let tokens = catch_panics(
            "entity",
            quote!(
                struct Kept;
            ),
            || panic!("boom"),
        );
        let text = tokens.to_string();
        assert!(text.contains("compile_error"), "{text}");
        assert!(
            text.contains("internal error in `#[entity]`: boom"),
            "{text}"
        );
        assert!(text.contains("struct Kept"), "{text}");
    }
}

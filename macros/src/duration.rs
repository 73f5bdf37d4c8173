//! Duration literals (`"90s"`, `"250ms"`, `"5m"`), parsed at compile time.

use std::time::Duration;

use proc_macro2::TokenStream;
use quote::quote;
use syn::LitStr;

/// Parses a duration literal with `humantime`; a bad literal is an error on it.
pub(crate) fn parse(option: &str, lit: &LitStr) -> syn::Result<Duration> {
    let text = lit.value();
    let duration = humantime::parse_duration(text.trim()).map_err(|error| {
        syn::Error::new(
            lit.span(),
            format!(
                "`{option}`: {text:?} is not a duration ({error}); write a number and a unit, \
                 like \"90s\", \"250ms\" or \"5m\""
            ),
        )
    })?;
    if duration.is_zero() {
        return Err(syn::Error::new(
            lit.span(),
            format!("`{option}` must be longer than zero, like \"90s\""),
        ));
    }
    Ok(duration)
}

/// The expression that rebuilds `duration` exactly, in its simplest unit.
pub(crate) fn to_tokens(duration: Duration) -> TokenStream {
    let private = crate::private();
    let nanos = duration.subsec_nanos();
    let secs = duration.as_secs();
    if nanos == 0 {
        quote!(#private::Duration::from_secs(#secs))
    } else if nanos.is_multiple_of(1_000_000) {
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        quote!(#private::Duration::from_millis(#millis))
    } else {
        quote!(#private::Duration::new(#secs, #nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> syn::Result<Duration> {
        let lit: LitStr = syn::LitStr::new(text, proc_macro2::Span::call_site());
        parse("max_idle", &lit)
    }

    #[test]
    fn common_units_parse() {
        assert_eq!(parse_str("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_str("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_str("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_str("1h 30m").unwrap(), Duration::from_secs(5400));
    }

    #[test]
    fn a_bad_literal_names_the_option_and_shows_examples() {
        let message = parse_str("ninety seconds").unwrap_err().to_string();
        assert!(
            message.starts_with("`max_idle`: \"ninety seconds\" is not a duration"),
            "{message}"
        );
        assert!(message.contains("\"250ms\""), "{message}");
        assert!(parse_str("90").is_err());
    }

    #[test]
    fn zero_is_rejected() {
        let message = parse_str("0s").unwrap_err().to_string();
        assert!(message.contains("longer than zero"), "{message}");
    }

    #[test]
    fn tokens_use_the_simplest_exact_unit() {
        assert_eq!(
            to_tokens(Duration::from_secs(90)).to_string(),
            quote!(::flotilla::__private::Duration::from_secs(90u64)).to_string()
        );
        assert_eq!(
            to_tokens(Duration::from_millis(250)).to_string(),
            quote!(::flotilla::__private::Duration::from_millis(250u64)).to_string()
        );
        assert_eq!(
            to_tokens(Duration::new(1, 5)).to_string(),
            quote!(::flotilla::__private::Duration::new(1u64, 5u32)).to_string()
        );
    }
}

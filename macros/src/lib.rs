//! Attribute macros of Flotilla: `#[entity]`, `#[rpc]` and `#[singleton]`.
//!
//! Use them through the `flotilla` crate (`use flotilla::prelude::*;`), which
//! re-exports them and provides the `::flotilla::__private` path that the
//! generated code names. The logic lives in modules that work on
//! `proc_macro2`, so it is unit-tested and snapshot-tested without a compiler;
//! the entry points here only convert token streams and turn a panic of the
//! macro into a compile error.

use proc_macro::TokenStream;
use quote::quote;

mod duration;
mod entity;
mod errors;
mod options;
mod singleton;

/// Makes an entity type from an inherent `impl` block.
///
/// ```ignore
/// #[entity(state = persisted)]
/// impl Account {
///     #[rpc(persisted, primary_key = transfer_id)]
///     async fn deposit(&mut self, transfer_id: u64, amount: i64) -> Result<i64, AccountError> {
///         self.balance += amount;
///         Ok(self.balance)
///     }
///
///     #[rpc]
///     async fn balance(&self) -> i64 {
///         self.balance
///     }
/// }
/// ```
///
/// The block is emitted as written (only the `#[rpc]` attributes are
/// removed), followed by `AccountRequest`, `AccountReply`, the typed
/// `AccountClient` and the `Entity` impl. Options: `name = "..."`,
/// `max_idle = "90s"`, `mailbox = 4096`, `state = persisted | volatile`. The
/// book's reference pages describe each option and every generated item.
#[proc_macro_attribute]
pub fn entity(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    errors::catch_panics("entity", item.clone(), || entity::expand(attr.into(), item)).into()
}

/// Makes a singleton from an `async fn(ctx: SingletonContext<S>) -> Result<(), E>`.
///
/// ```ignore
/// #[singleton(cron = "0 */5 * * * *", timezone = "Europe/Paris",
///             skip_if_older_than = "10m", state = ReportState)]
/// async fn nightly_report(ctx: SingletonContext<ReportState>) -> Result<(), ReportError> {
///     ctx.with_state(|s| s.runs += 1);
///     Ok(())
/// }
/// ```
///
/// The function is emitted as written, followed by a unit struct named after
/// it in CamelCase (`NightlyReport`) that implements `flotilla::Singleton`;
/// register it with `Cluster::builder().singleton::<NightlyReport>()`.
/// Options: `name = "..."` (default the function's name), `cron = "..."`
/// (5 fields, or 6 with seconds first; checked at compile time),
/// `timezone = "Area/City"` (IANA, checked at compile time),
/// `skip_if_older_than = "1m"` (the default), `state = T` (default the
/// `S` of `SingletonContext<S>`, else `()`).
#[proc_macro_attribute]
pub fn singleton(attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    errors::catch_panics("singleton", item.clone(), || {
        singleton::expand(attr.into(), item)
    })
    .into()
}

/// Marks an `async fn` of an `#[entity]` impl block as an rpc.
///
/// `#[entity]` reads and removes these attributes; this macro only runs when
/// `#[rpc]` is used outside such a block, and reports that as an error.
/// Options: `persisted`, `primary_key = argument`.
#[proc_macro_attribute]
pub fn rpc(_attr: TokenStream, item: TokenStream) -> TokenStream {
    let item = proc_macro2::TokenStream::from(item);
    let error = syn::Error::new(
        proc_macro2::Span::call_site(),
        "`#[rpc]` is only valid on methods inside an `#[entity]` impl block: put `#[entity]` on \
         the `impl` block that holds this method",
    )
    .to_compile_error();
    quote!(#error #item).into()
}

/// The path every generated item reaches the runtime through.
fn private() -> proc_macro2::TokenStream {
    quote!(::flotilla::__private)
}

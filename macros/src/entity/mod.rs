//! `#[entity]`: an `impl` block becomes an entity type.
//!
//! [`parse`] checks the block (and [`rpc`] each method) and builds the
//! [`model`]; [`expand`] and [`client`] generate the request and reply enums,
//! the `Entity` impl and the typed client from it.

mod client;
mod expand;
mod model;
mod parse;
mod rpc;
#[cfg(test)]
mod tests;

use proc_macro2::TokenStream;
use quote::quote;
use syn::Item;

use crate::errors::Errors;
use crate::options;

/// Expands `#[entity(attr)] item`.
///
/// On errors the output is the user's item (with its `#[rpc]` attributes
/// stripped, so they are not resolved as attributes of their own) followed by
/// one `compile_error!` per problem.
pub(crate) fn expand(attr: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::new();
    let options = options::parse_entity(attr, &mut errors);
    let item: Item = match syn::parse2(item.clone()) {
        Ok(item) => item,
        Err(error) => {
            errors.push(error);
            return with_errors(item, errors);
        }
    };
    let mut block = match item {
        Item::Impl(block) => block,
        other => {
            errors.push(not_an_impl_block(&other));
            return with_errors(quote!(#other), errors);
        }
    };
    let entity = parse::parse(options, &mut block, &mut errors);
    match (entity, errors.finish()) {
        (Some(entity), Ok(())) => expand::expand(&block, &entity),
        (_, Err(error)) => {
            let error = error.to_compile_error();
            quote!(#block #error)
        }
        (None, Ok(())) => unreachable!("an entity that did not parse has recorded an error"),
    }
}

fn with_errors(item: TokenStream, errors: Errors) -> TokenStream {
    let error = errors.finish().err().map(|error| error.to_compile_error());
    quote!(#item #error)
}

/// The error for `#[entity]` on a struct, a function or any other non-impl item.
fn not_an_impl_block(item: &Item) -> syn::Error {
    let usage = "`#[entity]` goes on the inherent `impl` block of the entity type, like \
                 `#[entity] impl Account { #[rpc] async fn balance(&self) -> i64 { .. } }`";
    let (tokens, hint) = match item {
        Item::Struct(item) => (
            {
                let (struct_token, ident) = (&item.struct_token, &item.ident);
                quote!(#struct_token #ident)
            },
            format!(
                "; keep `#[derive(Default)]` on the struct and move `#[entity]` to `impl {}`",
                item.ident
            ),
        ),
        Item::Enum(item) => {
            let (enum_token, ident) = (&item.enum_token, &item.ident);
            (quote!(#enum_token #ident), String::new())
        }
        Item::Fn(item) => {
            let sig = &item.sig;
            let fn_token = &sig.fn_token;
            let ident = &sig.ident;
            (
                quote!(#fn_token #ident),
                "; a function cannot be an entity: put it in an impl block as a `#[rpc]` method"
                    .to_owned(),
            )
        }
        other => (quote!(#other), String::new()),
    };
    syn::Error::new_spanned(tokens, format!("{usage}{hint}"))
}

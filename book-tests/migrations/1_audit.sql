-- The application's own table that the book's staged effects write to
-- (`persisted.md`), migrated by the application's `sqlx::migrate!` next to
-- Flotilla's own migrations (`storage.md`).
CREATE TABLE audit (
    account TEXT NOT NULL,
    amount INTEGER NOT NULL
);

// The dashboard page: draws /api/dashboard (docs/dashboard.md).

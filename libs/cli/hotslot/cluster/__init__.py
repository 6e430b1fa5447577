"""Running hotslot services as local processes: one service (`process`) or a whole cluster (`local`)."""

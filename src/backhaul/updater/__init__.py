"""The updater on the connector host: signed releases installed side by side, switched
atomically, health-gated, rolled back without a person (`backhaul updater run|apply|install`)."""

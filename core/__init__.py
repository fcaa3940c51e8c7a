"""dermq's core: settings, database, crypto, audit trail and the case services shared by api and worker."""

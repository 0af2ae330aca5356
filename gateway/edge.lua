-- Request checks of the JSON API that Envoy has no setting for, and the server's error
-- bodies put in place of the transcoder's google.rpc.Status JSON. Rendered into
-- envoy.yaml by gateway/envoy_config.py; the limits below come from its flags.
-- gRPC callers (content-type application/grpc...) pass through untouched.

local MAX_PATH_BYTES = ${max_path_bytes}
local MAX_HEADER_BYTES = ${max_header_bytes}
local MAX_AUTHORIZATION_BYTES = ${max_authorization_bytes}

-- The caller's x-request-id, moved aside by Envoy's early header mutation (which then made a
-- fresh id): kept when valid, dropped otherwise (gateway/envoy_config.py, request_id_settings).
local CALLER_REQUEST_ID = "x-esm-caller-request-id"
local MAX_REQUEST_ID_BYTES = 128

local function restore_request_id(headers)
  local caller = headers:get(CALLER_REQUEST_ID)
  headers:remove(CALLER_REQUEST_ID)
  if caller and #caller <= MAX_REQUEST_ID_BYTES and caller:match("^[A-Za-z0-9][A-Za-z0-9._:-]*$") then
    headers:replace("x-request-id", caller)
  end
end

-- What the client sent, for the access log (gateway/envoy_config.py, ACCESS_LOG_FORMAT): the
-- transcoder turns every JSON call into a gRPC POST and rewrites the path, and HEAD is served as
-- GET below. Set on every request this filter sees, so no caller chooses what is logged.
local CLIENT_METHOD = "x-esm-client-method"
local CLIENT_PATH = "x-esm-client-path"

-- The path as a log field: every byte outside RFC 3986's path and query characters (a quote, a
-- backslash, control and non-ASCII bytes) percent-encoded, so caller text cannot end a quoted
-- field or forge one.
local function escaped(text)
  return (text:gsub("[^%w%-%._~!$&'()*+,;=:@/?%%]", function(c) return string.format("%%%02X", c:byte()) end))
end

local function reject(handle, status, message)
  -- Envoy's local_reply_config turns this into the JSON error shape.
  handle:respond({[":status"] = tostring(status)}, message)
end

function envoy_on_request(handle)
  local headers = handle:headers()
  restore_request_id(headers)
  local method = headers:get(":method") or ""
  headers:replace(CLIENT_METHOD, method)
  headers:replace(CLIENT_PATH, escaped(headers:get(":path") or ""))
  local content_type = (headers:get("content-type") or ""):lower()
  if content_type:sub(1, 16) == "application/grpc" then
    return
  end
  -- Set only by this filter and the server.
  headers:remove("x-esm-content-encoding")
  headers:remove("x-esm-http-status")
  headers:remove("x-esm-error")

  local path = headers:get(":path") or ""
  if #path > MAX_PATH_BYTES then
    return reject(handle, 414, "the URL path is " .. #path .. " bytes; at most " .. MAX_PATH_BYTES .. " are accepted")
  end
  local size = 0
  for name, value in pairs(headers) do
    size = size + #name + #value
  end
  if size > MAX_HEADER_BYTES then
    return reject(handle, 431, "the request headers total " .. size .. " bytes; at most " .. MAX_HEADER_BYTES .. " are accepted")
  end
  local authorization = headers:get("authorization")
  if authorization and #authorization > MAX_AUTHORIZATION_BYTES then
    return reject(handle, 401, "invalid API key: the Authorization header is longer than " .. MAX_AUTHORIZATION_BYTES
      .. " bytes; send 'Authorization: Token <key>'")
  end
  local route, query = path:match("^([^?]*)%??(.*)$")
  if route:find("%", 1, true) then
    -- Model names and actions are plain ASCII; escapes could decode to invalid UTF-8.
    return reject(handle, 400, "the URL path contains percent-encoded characters; model names and actions are plain ASCII")
  end
  if query ~= "" then
    -- The transcoder binds query parameters to request fields (?action=, ?model=, ?file=) over
    -- the path's, while Envoy routes by the path alone: the path decides, and nothing else is read.
    return reject(handle, 400, "query parameters are not accepted: the URL path names the model and action, "
      .. "and a POST's options go in its JSON body")
  end
  local timeout = headers:get("grpc-timeout")
  if timeout and not timeout:match("^%d%d?%d?%d?%d?%d?%d?%d?[HMSmun]$") then
    return reject(handle, 400, "malformed grpc-timeout header; expected 1 to 8 digits and a unit (H, M, S, m, u, n)")
  end

  if method == "HEAD" then
    -- Answered as GET, which the http rules bind; Envoy sends the headers only (the access log
    -- still says HEAD: CLIENT_METHOD).
    headers:replace(":method", "GET")
    return
  end
  if method ~= "POST" then
    return
  end
  local media_type = content_type:match("^%s*([^;%s]+)")
  if media_type ~= "application/json" then
    return reject(handle, 415, "Content-Type must be application/json (curl: -H 'Content-Type: application/json'); got '"
      .. (media_type or ""):sub(1, 40) .. "'")
  end
  local encoding = headers:get("content-encoding")
  if encoding then
    encoding = encoding:lower():match("^%s*(.-)%s*$")
    if encoding ~= "gzip" and encoding ~= "identity" then
      return reject(handle, 415, "Content-Encoding '" .. encoding:sub(1, 40) .. "' is not supported; send gzip or no encoding")
    end
    -- The server inflates the body itself, bounded (service/api/json_body.py).
    headers:remove("content-encoding")
    headers:add("x-esm-content-encoding", encoding)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if (headers:get("content-type") or ""):sub(1, 16) == "application/grpc" then
    return
  end
  -- gRPC's own headers (grpc-status, grpc-message, grpc-accept-encoding) come through the
  -- transcoder: internal to the JSON API, whose status is the HTTP one.
  local internal = {}
  for name, _ in pairs(headers) do
    if name:sub(1, 5) == "grpc-" then
      internal[#internal + 1] = name
    end
  end
  for _, name in ipairs(internal) do
    headers:remove(name)
  end
  local error_body = headers:get("x-esm-error")
  if error_body == nil then
    return
  end
  local status = headers:get("x-esm-http-status") or headers:get(":status")
  headers:remove("x-esm-error")
  headers:remove("x-esm-http-status")
  headers:replace(":status", status)
  headers:replace("content-type", "application/json")
  handle:body(true):setBytes(error_body)
end
